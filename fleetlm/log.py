"""The ``fleetlm`` logger's default handler (for the CLI, ``LLM`` and the server alike)."""

from __future__ import annotations

import logging


def configure_logging() -> None:
    log = logging.getLogger("fleetlm")
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s fleetlm: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
