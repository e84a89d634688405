"""Serving LoRA adapters (PEFT layout) next to the base model: several adapters and none in one
batch. Training adapters lives in ``fleetlm/layers/lora.py`` and ``fleetlm/train``."""

from fleetlm.lora.request import LoRARequest, parse_lora_modules

__all__ = ["LoRARequest", "parse_lora_modules"]
