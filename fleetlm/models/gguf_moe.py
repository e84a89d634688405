"""Mixture-of-experts GGUF files: their metadata as a ``MoEConfig`` and their stacked expert
tensors as the Hugging Face names the MoE models load.

Spellings (llama.cpp's converters):

- Mixtral: architecture ``llama`` with ``llama.expert_count`` / ``llama.expert_used_count``;
  experts as wide as ``feed_forward_length``; top-k weights renormalised.
- Qwen2-MoE: ``qwen2moe``, ``expert_feed_forward_length``, one shared expert of
  ``expert_shared_feed_forward_length`` with a sigmoid gate (``ffn_gate_inp_shexp``); top-k
  weights not renormalised.
- Qwen3-MoE: ``qwen3moe``, ``expert_feed_forward_length``, q/k norms; renormalised.
  ``{arch}.expert_weights_norm``, when present, says whether to renormalise.

Tensors: ``blk.N.ffn_gate_inp`` (the router, [E, hidden]); ``ffn_gate_exps`` / ``ffn_up_exps``
([E, width, hidden]) and ``ffn_down_exps`` ([E, hidden, width]), one slice per expert;
``ffn_{gate,up,down}_shexp`` (the shared expert); ``attn_q_norm`` / ``attn_k_norm``. MXFP4
expert tensors stay quantized (``quantization/mxfp4.py``: ``MXFP4MoEMethod``); experts of every
other type are dequantized at load. A file whose
expert tensors disagree with its metadata is refused naming the tensor and the key.
"""

from __future__ import annotations

from typing import Any

from fleetlm.moe.config import MoEConfig

MOE_ARCHS = {"qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}
_RENORMALISE = {"llama": True, "qwen2moe": False, "qwen3moe": True}
_EXPERT_KINDS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
_SHARED = {"ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
           "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
           "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


def tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """A ``GGUFReader``'s tensors: name -> shape, rows first (as torch sees it)."""
    return {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in reader.tensors}


def is_moe_gguf(fields: dict[str, Any]) -> bool:
    arch = fields.get("general.architecture")
    return arch in MOE_ARCHS or bool(fields.get(f"{arch}.expert_count"))


def moe_config_from_gguf(fields: dict[str, Any], tensors: dict[str, tuple[int, ...]]) -> tuple[str, MoEConfig, int]:
    """(architecture, MoE config, dense MLP width) of an MoE GGUF; ``tensors``: name -> shape
    (rows first, as torch sees it). ``ValueError`` naming what disagrees."""
    arch = fields["general.architecture"]
    if arch not in (*MOE_ARCHS, "llama"):
        raise ValueError(f"GGUF architecture {arch!r} with experts is not supported; supported: llama (Mixtral), "
                         f"{', '.join(MOE_ARCHS)}")

    def get(key: str) -> Any:
        v = fields.get(f"{arch}.{key}")
        if v is None:
            raise ValueError(f"GGUF metadata is missing {arch}.{key}")
        return int(v)

    experts, top_k = get("expert_count"), get("expert_used_count")
    if not 1 <= top_k <= experts:
        raise ValueError(f"GGUF metadata: {arch}.expert_used_count {top_k} is not between 1 and "
                         f"{arch}.expert_count {experts}")
    width = get("feed_forward_length") if arch == "llama" else get("expert_feed_forward_length")
    shared = int(fields.get(f"{arch}.expert_shared_feed_forward_length") or 0)
    norm = fields.get(f"{arch}.expert_weights_norm")
    moe_layers = sorted({int(n.split(".")[1]) for n in tensors if n.endswith(".ffn_gate_inp.weight")})
    num_layers = get("block_count")
    dense = tuple(i for i in range(num_layers) if i not in moe_layers)
    moe = MoEConfig(num_experts=experts, top_k=top_k, moe_intermediate_size=width,
                    norm_topk_prob=bool(norm) if norm is not None else _RENORMALISE[arch],
                    num_shared_experts=1 if shared else 0, shared_expert_intermediate_size=shared,
                    shared_expert_gate=bool(shared) and arch == "qwen2moe", mlp_only_layers=dense)
    check_expert_tensors(arch, moe, moe_layers, tensors)
    dense_width = int(fields.get(f"{arch}.feed_forward_length") or width)
    return MOE_ARCHS.get(arch, "MixtralForCausalLM"), moe, dense_width


def check_expert_tensors(arch: str, moe: MoEConfig, layers: list[int], tensors: dict[str, tuple[int, ...]]) -> None:
    if not layers:
        raise ValueError(f"GGUF metadata {arch}.expert_count = {moe.num_experts} but no blk.N.ffn_gate_inp.weight "
                         "(router) tensor is in the file")
    e, w = moe.num_experts, moe.moe_intermediate_size
    for i in layers:
        want = {f"blk.{i}.ffn_gate_inp.weight": (e, None), f"blk.{i}.ffn_gate_exps.weight": (e, w, None),
                f"blk.{i}.ffn_up_exps.weight": (e, w, None), f"blk.{i}.ffn_down_exps.weight": (e, None, w)}
        for name, shape in want.items():
            got = tensors.get(name)
            if got is None:
                raise ValueError(f"GGUF layer {i} routes to experts but has no {name}")
            if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
                raise ValueError(f"GGUF tensor {name} has shape {list(got)}, which does not match the metadata "
                                 f"({arch}.expert_count = {e}, expert width {w}): expected "
                                 f"{['*' if s is None else s for s in shape]}")


def hf_names(gguf_name: str, layer: str, kind: str, family_prefix: str) -> str | None:
    """The HF name of a non-expert MoE tensor (router, shared expert, q/k norm), or None."""
    if kind == "ffn_gate_inp":
        return f"model.layers.{layer}.{family_prefix}.gate.weight"
    if kind in _SHARED:
        return f"model.layers.{layer}.{_SHARED[kind]}.weight"
    return None


def expert_slices(layer: str, kind: str, stacked, architecture: str):
    """``(hf_name, [rows, cols] array)`` per expert of a stacked ``ffn_*_exps`` tensor."""
    part = _EXPERT_KINDS[kind]
    if architecture == "MixtralForCausalLM":
        prefix, names = "block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}
    else:
        prefix, names = "mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    for e in range(stacked.shape[0]):
        yield f"model.layers.{layer}.{prefix}.experts.{e}.{names[part]}.weight", stacked[e]


def family_prefix(architecture: str) -> str:
    return "block_sparse_moe" if architecture == "MixtralForCausalLM" else "mlp"


def is_expert_kind(kind: str) -> bool:
    return kind in _EXPERT_KINDS
