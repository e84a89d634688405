"""Naming an adapter: ``LoRARequest`` (vLLM's spelling) and the ``--lora-modules`` syntax."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


@dataclass(frozen=True)
class LoRARequest:
    """An adapter a request runs with: ``lora_name`` is what clients put in ``model``;
    ``lora_int_id`` is accepted for vLLM compatibility (only its positivity is checked: adapters
    are keyed by name); ``lora_path`` is a PEFT directory (adapter_config.json,
    adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        check_lora_name(self.lora_name)
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("lora_path must be a non-empty path to a PEFT adapter directory")


def check_lora_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"invalid LoRA adapter name {name!r}: 1-128 characters, letters, digits and ._:/@+- "
                         "(starting with a letter or digit)")
    return name


def parse_lora_modules(items: list[str] | tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``name=path`` or ``{"name": ..., "path": ...}`` (vLLM's two spellings) -> ((name, path), ...).
    A repeated name is an error."""
    out: dict[str, str] = {}
    for item in items:
        text = item.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise ValueError(f"--lora-modules {item!r}: not valid JSON ({e})") from None
            unknown = sorted(set(obj) - {"name", "path"}) if isinstance(obj, dict) else []
            if not isinstance(obj, dict) or unknown or not isinstance(obj.get("path"), str):
                raise ValueError(f"--lora-modules {item!r}: expected {{\"name\": ..., \"path\": ...}}"
                                 + (f"; unknown key(s) {', '.join(unknown)}" if unknown else ""))
            name, path = obj.get("name"), obj["path"]
        else:
            name, sep, path = text.partition("=")
            if not sep or not path:
                raise ValueError(f"--lora-modules {item!r}: expected name=path")
        check_lora_name(name)
        if name in out:
            raise ValueError(f"--lora-modules names the adapter {name!r} twice")
        out[name] = path
    return tuple(out.items())
