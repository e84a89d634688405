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


_GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "block_sparse_moe.gate": "ffn_gate_inp",
          "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
          "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
          "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
_EXPERT_PART = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps", "gate_proj": "ffn_gate_exps",
                "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def write_gguf_header(w, cfg: dict) -> None:
    """A Llama-shaped HF ``config.json`` as GGUF metadata on writer ``w``, with SmolLM2's
    tokenizer fields (the tiny test models use its vocabulary)."""
    import gguf

    from fleetlm.models.hub import resolve_model
    from fleetlm.models.loader import gguf_fields

    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")))
    tok = gguf_fields(gguf.GGUFReader(str(resolve_model("smollm2-135m-instruct"))))
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tok["tokenizer.ggml.tokens"])
    w.add_token_types(tok["tokenizer.ggml.token_type"])
    w.add_token_merges(tok["tokenizer.ggml.merges"])
    w.add_bos_token_id(tok["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(tok["tokenizer.ggml.eos_token_id"])
    w.add_chat_template(tok["tokenizer.chat_template"])


def permute_qk(a, n: int):
    """Llama q/k rows as llama.cpp's converter interleaves them (the inverse of the loader's
    unpermute) for ``n`` heads."""
    return a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def write_moe_gguf(hf_dir: Path, out: Path, family: str, *, expert_count: int | None = None) -> Path:
    """The tiny HF MoE directory as a GGUF file the way llama.cpp's converter lays it out (F32
    tensors, stacked experts, Llama q/k rows permuted, SmolLM2's tokenizer fields).
    ``expert_count`` overrides the metadata (a file that disagrees with its tensors)."""
    import json
    import re

    import gguf
    import numpy as np
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = _GGUF_ARCH[family]
    w = gguf.GGUFWriter(str(out), arch)
    heads, kv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    experts = cfg.get("num_local_experts") or cfg["num_experts"]
    write_gguf_header(w, cfg)
    w.add_key_length(cfg.get("head_dim") or hidden // heads)
    w.add_value_length(cfg.get("head_dim") or hidden // heads)
    w.add_expert_count(expert_count or experts)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if family != "mixtral":
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])

    state = {k: v.float().numpy() for k, v in load_file(str(next(hf_dir.glob("*.safetensors")))).items()}
    stacks: dict[str, dict[int, np.ndarray]] = {}

    for name, a in state.items():
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name == "lm_head.weight":
            w.add_tensor("output.weight", a)
        elif m := re.match(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight", name):
            stacks.setdefault(f"blk.{m[1]}.{_EXPERT_PART[m[3]]}.weight", {})[int(m[2])] = a
        else:
            m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
            kind = _LAYER[m[2]]
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                a = permute_qk(a, heads if kind == "attn_q" else kv)
            if kind == "ffn_gate_inp_shexp":
                a = a.reshape(-1)
            w.add_tensor(f"blk.{m[1]}.{kind}.{m[3]}", a)
    for name, parts in stacks.items():
        w.add_tensor(name, np.stack([parts[e] for e in sorted(parts)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
