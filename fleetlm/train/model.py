"""The model to train: the serving model class (``models/llama.py``) in training mode.

Weights always enter through ``load_weights`` with full Hugging Face tensors, so every
parallel layout slices the same numbers: a model from a checkpoint streams its tensors; a model
from scratch draws them from ``seed`` (normal(0, 0.02) matrices, unit norms, zero biases) in a
fixed order, independent of the layout.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fleetlm.models.loader import ModelConfig, config_from_hf
from fleetlm.models.tokenizer import Tokenizer
from fleetlm.train.config import ModelSection

# Hugging Face config fields of the from-scratch presets (vocabulary: the tokenizer's)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


@dataclass
class TrainModel:
    """The model, its tokenizer and its Hugging Face config (what an export writes)."""

    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    hf_config: dict[str, Any]


def hf_config_dict(cfg: ModelConfig, tokenizer: Tokenizer, max_positions: int) -> dict[str, Any]:
    model_type = {"Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}.get(cfg.architecture, "llama")
    out = {
        "architectures": [cfg.architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": max_positions,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
    }
    if model_type == "llama":
        out["attention_bias"] = cfg.attention_bias
        out["mlp_bias"] = False
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") in ("linear", "llama3"):
        out["rope_scaling"] = dict(cfg.rope_scaling)
    return out


def scratch_weights(cfg: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Full Hugging Face tensors of a fresh model, drawn in a fixed order from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    h, d = cfg.hidden_size, cfg.head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    yield "model.embed_tokens.weight", normal(cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", torch.ones(h)
        yield p + "post_attention_layernorm.weight", torch.ones(h)
        for name, rows in (("q", cfg.num_heads * d), ("k", cfg.num_kv_heads * d), ("v", cfg.num_kv_heads * d)):
            yield p + f"self_attn.{name}_proj.weight", normal(rows, h)
            if cfg.attention_bias:
                yield p + f"self_attn.{name}_proj.bias", torch.zeros(rows)
        yield p + "self_attn.o_proj.weight", normal(h, cfg.num_heads * d)
        yield p + "mlp.gate_proj.weight", normal(cfg.intermediate_size, h)
        yield p + "mlp.up_proj.weight", normal(cfg.intermediate_size, h)
        yield p + "mlp.down_proj.weight", normal(h, cfg.intermediate_size)
    yield "model.norm.weight", torch.ones(h)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", normal(cfg.vocab_size, h)


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str) -> Tokenizer:
    from fleetlm.models.hub import resolve_model
    from fleetlm.models.loader import load_model_files

    return load_model_files(resolve_model(name), torch.float32).tokenizer


def build_train_model(sec: ModelSection) -> TrainModel:
    """Build this rank's model (its TP slice, from ``parallel_state``) in float32 with
    gradients on. Pipeline stages are cut from it afterwards (``train/pipeline.py``)."""
    from fleetlm.models.hub import resolve_model
    from fleetlm.models.loader import load_model_files
    from fleetlm.models.registry import get_model_class

    if sec.size is not None:
        if sec.size not in PRESETS:
            raise ValueError(f"model.size {sec.size!r} is not a preset; presets: {', '.join(PRESETS)}")
        tok = _tokenizer(sec.tokenizer)
        hf = dict(PRESETS[sec.size], architectures=["LlamaForCausalLM"], vocab_size=tok.vocab_size,
                  max_position_embeddings=sec.max_positions)
        cfg = config_from_hf(hf)
        weights = scratch_weights(cfg, sec.seed)
    else:  # model.quantization (QLoRA): the linear layers quantize their weights as they load;
        # without it the weights train in fp32, so a pre-quantized (GPTQ / AWQ) directory is dequantized
        files = load_model_files(resolve_model(sec.path), torch.float32, quantization=sec.quantization or "dequantize")
        cfg, tok, weights = files.config, files.tokenizer, files.weights
    with torch.device("cpu"):
        model = get_model_class(cfg.architecture)(cfg, torch.float32, sec.max_positions)
    model.load_weights(weights)
    model.requires_grad_(True).train()
    return TrainModel(model, cfg, tok, hf_config_dict(cfg, tok, sec.max_positions))
