"""The front end's view of the loaded adapters (``LLMEngine`` and ``AsyncLLM``): it checks an
adapter fully before any core loads it, so a bad adapter is the caller's ``ValueError`` (HTTP 400)
and never an engine-core failure, and it refuses requests naming an adapter that is not loaded."""

from __future__ import annotations

from pathlib import Path

import torch

from fleetlm.lora.adapter import load_lora_weights
from fleetlm.lora.request import check_lora_name
from fleetlm.models.loader import ModelConfig


class LoRARegistry:
    def __init__(self, enabled: bool, max_loras: int, model_config: ModelConfig,
                 modules: tuple[tuple[str, str], ...] = ()) -> None:
        self.enabled = enabled
        self.max_loras = max_loras
        self.model_config = model_config
        self.adapters: dict[str, str] = dict(modules)  # name -> path

    def check_request(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            raise ValueError(f"no LoRA adapter named {name!r} is loaded (loaded: {loaded})")

    def prepare_add(self, name: str, path: str) -> bool:
        """Check an adapter before loading it. False: this exact adapter is already loaded."""
        if not self.enabled:
            raise ValueError("LoRA adapters are not enabled: start the engine with enable_lora=True (--enable-lora)")
        check_lora_name(name)
        if name in self.adapters:
            if self.adapters[name] == path:
                return False
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded from {self.adapters[name]!r}")
        if len(self.adapters) >= self.max_loras:
            raise ValueError(f"{len(self.adapters)} LoRA adapters are loaded, the most max_loras allows; unload one")
        if not Path(path).is_dir():
            raise ValueError(f"LoRA adapter {name!r}: {path!r} is not a directory")
        load_lora_weights(name, path, self.model_config, torch.float32)  # every check the workers make
        return True

    def added(self, name: str, path: str) -> None:
        self.adapters[name] = path

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded")
        del self.adapters[name]
