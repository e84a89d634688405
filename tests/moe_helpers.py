"""Tiny random MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE) saved as Hugging Face directories."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def make_tiny_moe_dir(out: Path, family: str = "mixtral", *, seed: int = 0, **overrides) -> Path:
    """A random-weight MoE directory with SmolLM2's tokenizer (so text prompts work)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.2)
    if family == "mixtral":
        common.update(num_local_experts=8, num_experts_per_tok=2)
        cls, cfg_cls = transformers.MixtralForCausalLM, transformers.MixtralConfig
    elif family == "qwen2_moe":  # shared expert with its gate; layer 1 dense; weights not renormalised
        common.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False)
        cls, cfg_cls = transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig
    elif family == "qwen3_moe":  # many experts, top-4, renormalised, QK norm
        common.update(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, norm_topk_prob=True,
                      head_dim=16)
        cls, cfg_cls = transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    common.update(overrides)
    model = cls(cfg_cls(**common))
    model.save_pretrained(out, safe_serialization=True)
    _tokenizer(out)
    return out


def _tokenizer(out: Path) -> None:
    import json

    import gguf

    from fleetlm.models.hub import resolve_model
    from fleetlm.models.loader import gguf_fields
    from fleetlm.models.tokenizer import tokenizer_from_gguf_fields

    tok = tokenizer_from_gguf_fields(gguf_fields(gguf.GGUFReader(str(resolve_model("smollm2-135m-instruct")))))
    tok.backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tok.chat_template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
