"""Model registry: architecture name (as in config.json ``architectures``) -> model class."""

from __future__ import annotations

import importlib

_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "fleetlm.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "fleetlm.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "fleetlm.models.llama:LlamaForCausalLM",
    "MixtralForCausalLM": "fleetlm.models.moe:MixtralForCausalLM",
    "Qwen2MoeForCausalLM": "fleetlm.models.moe:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "fleetlm.models.moe:Qwen3MoeForCausalLM",
}


def register_model(architecture: str, target: str) -> None:
    """Add a family: ``target`` is "module.path:ClassName", imported on first use."""
    _MODELS[architecture] = target


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type:
    target = _MODELS.get(architecture)
    if target is None:
        raise ValueError(
            f"model architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        )
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def build_model(files, dtype, max_positions: int, layers: range | None = None, device=None):
    """Build the model class for ``files.config`` on ``device`` and load this rank's slice of
    ``files.weights`` (the engine's workers and training both start here)."""
    import torch

    cfg = files.config
    cls = get_model_class(cfg.architecture)
    with torch.device(device or "cpu"):  # params are torch.empty: filled by load_weights
        model = cls(cfg, dtype, max_positions, layers)
    model.load_weights(files.weights)
    return model
