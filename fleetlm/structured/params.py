"""What a request asks its output to match: exactly one kind of constraint.

``StructuredOutputsParams`` is plain data (it travels with ``SamplingParams`` to the engine-core
process). A JSON schema given as a dict is stored as compact JSON text, keys in the order given
(the order of ``properties`` is the order the output follows), so equal schemas share one
compiled grammar (the cache key is ``key``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's spelling: set exactly one of ``json`` (a JSON schema, dict or text), ``regex``,
    ``choice`` (a list of strings), ``grammar`` (EBNF, root rule ``root``), ``json_object=True``
    (any JSON object) or ``structural_tag`` (xgrammar's structural-tag JSON, used for tool calls).

    ``strict`` (JSON schema only): no property or item the schema does not name, as OpenAI's
    ``strict: true`` asks; with ``strict=False`` the schema's own ``additionalProperties`` rules
    apply. ``disable_any_whitespace``: JSON in its compact form only (otherwise any whitespace,
    up to ``MAX_WHITESPACE`` characters between elements, so a model cannot loop on blanks).
    """

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None
    strict: bool = True
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if self.json is not None and not isinstance(self.json, str):
            object.__setattr__(self, "json", canonical_json(self.json, "json"))
        if self.structural_tag is not None and not isinstance(self.structural_tag, str):
            object.__setattr__(self, "structural_tag", canonical_json(self.structural_tag, "structural_tag"))
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must be a list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice:
                raise ValueError("structured_outputs.choice must hold at least one string")
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(KINDS)}; got {what}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple:
        """Everything that changes the compiled grammar (the tokenizer is the engine's own)."""
        spec = getattr(self, self.kind)
        return (self.kind, spec, self.strict, self.disable_any_whitespace)


def canonical_json(value: Any, name: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"structured_outputs.{name} is not JSON-serializable: {e}") from None
