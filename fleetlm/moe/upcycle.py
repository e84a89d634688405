"""Sparse upcycling: a dense Llama-family model becomes a mixture of experts.

Every MLP is copied into ``num_experts`` identical experts and a new router is drawn (normal,
std ``router_std``). With top-k weights renormalised (Mixtral always renormalises) a token's
output is ``sum_k w_k * MLP(x) = MLP(x)``: the upcycled model starts out computing what the
dense one did (up to float rounding) whatever the router says, and training then lets the
experts diverge. Llama / Mistral / SmolLM2 become ``MixtralForCausalLM``; Qwen2 (attention bias)
becomes ``Qwen2MoeForCausalLM`` with ``norm_topk_prob`` and no shared expert.

Input: anything ``load_model_files`` reads (HF directory or GGUF, dequantized); output: an HF
directory (config.json, model.safetensors, tokenizer files) that fleetlm and transformers load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

_MLP = re.compile(r"^(model\.layers\.\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def upcycle(src: str | Path, out: str | Path, *, num_experts: int = 8, top_k: int = 2, seed: int = 0,
            router_std: float = 0.02) -> Path:
    """Write the upcycled model of ``src`` to directory ``out``; returns ``out``."""
    from safetensors.torch import save_file

    from fleetlm.models.hub import resolve_model
    from fleetlm.models.loader import load_model_files
    from fleetlm.train.export import save_tokenizer
    from fleetlm.train.model import hf_config_dict

    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"upcycling needs 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    files = load_model_files(resolve_model(str(src)), torch.float32)
    cfg = files.config
    if cfg.moe is not None:
        raise ValueError(f"{src} is already a mixture of experts")
    if cfg.architecture not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        raise ValueError(f"upcycling supports Llama, Mistral and Qwen2 models, not {cfg.architecture}")
    qwen = cfg.architecture == "Qwen2ForCausalLM"
    hf = hf_config_dict(cfg, files.tokenizer, cfg.max_position_embeddings)
    hf.update(_moe_fields(qwen, num_experts, top_k, cfg.intermediate_size))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = dict(_expert_weights(files.weights, num_experts, qwen, cfg.hidden_size, router_std, g))
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    save_tokenizer(files.tokenizer, out)
    return out


def _moe_fields(qwen: bool, num_experts: int, top_k: int, width: int) -> dict:
    if qwen:
        return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_experts": num_experts,
                "num_experts_per_tok": top_k, "moe_intermediate_size": width, "norm_topk_prob": True,
                "shared_expert_intermediate_size": 0, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "qkv_bias": True}
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": num_experts,
            "num_experts_per_tok": top_k, "router_aux_loss_coef": 0.01}


def _expert_weights(weights: Iterator[tuple[str, torch.Tensor]], num_experts: int, qwen: bool, hidden: int,
                    std: float, g: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    routers: set[str] = set()
    for name, t in weights:
        m = _MLP.match(name)
        if m is None:
            yield name, t
            continue
        layer, kind = m.groups()
        block = f"{layer}.mlp" if qwen else f"{layer}.block_sparse_moe"
        for e in range(num_experts):
            yield f"{block}.experts.{e}.{kind if qwen else _MIXTRAL[kind]}.weight", t.clone()
        if block not in routers:
            routers.add(block)
            yield f"{block}.gate.weight", torch.randn(num_experts, hidden, generator=g) * std
