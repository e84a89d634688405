"""Load a model's config, weights and tokenizer from a GGUF file or a Hugging Face directory.

Weights come out with Hugging Face parameter names (``model.layers.0.self_attn.q_proj.weight``)
in the requested dtype; the model classes only ever see that one naming.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fleetlm.models.tokenizer import Tokenizer, tokenizer_from_gguf_fields, tokenizer_from_hf_dir
from fleetlm.moe.config import MoEConfig, moe_config_from_hf

GGUF_MAGIC = b"GGUF"
ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # registry key, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    quantization: Any = field(default=None, hash=False, compare=False)  # fleetlm.quantization.QuantConfig
    moe: MoEConfig | None = None  # mixture of experts (fleetlm/moe/config.py), None when dense


@dataclass
class LoadedModel:
    config: ModelConfig
    tokenizer: Tokenizer
    weights: Iterator[tuple[str, torch.Tensor]]  # (hf_name, tensor), streamed
    source: str  # "gguf" or "hf"


def load_model_files(path: Path, dtype: torch.dtype, quantization: str | None = None) -> LoadedModel:
    """Dispatch on what ``path`` is; anything else is a ``ValueError`` saying what was found.
    ``quantization`` names a format the weights are quantized to at load (fleetlm/quantization)."""
    files = _load_files(path, dtype, quantization)
    if quantization == "gguf" and files.source != "gguf":
        raise ValueError(f"quantization 'gguf' keeps a GGUF file's tensors quantized; {path} is not a GGUF file")
    if quantization in ("gptq", "awq") and getattr(files.config.quantization, "name", None) != quantization:
        raise ValueError(f"quantization {quantization!r} loads a Hugging Face directory whose config.json "
                         f"quantization_config has quant_method {quantization!r}; {path} is not one")
    if quantization not in (None, "gguf", "gptq", "awq"):  # gptq / awq: set by the HF loader
        from fleetlm.quantization import get_quant_config

        files.config = dataclasses.replace(files.config, quantization=get_quant_config(quantization))
    return files


def _load_files(path: Path, dtype: torch.dtype, quantization: str | None) -> LoadedModel:
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is a directory without config.json: not a Hugging Face model directory")
        return _load_hf_dir(path, dtype, quantization)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{path} is neither a GGUF file (magic {magic!r}, expected b'GGUF') nor a Hugging Face "
            "model directory (config.json + *.safetensors)"
        )
    # a GGUF's quantized tensors stay quantized unless another format is asked for; fp32 is the
    # reference precision and dequantizes unless "gguf" asks to keep them
    keep = quantization == "gguf" or (quantization is None and dtype != torch.float32)
    return _load_gguf(path, dtype, keep_quantized=keep)


# -- Hugging Face directory -------------------------------------------------------------------
_HF_ARCH_ALIASES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    try:
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        return ModelConfig(
            architecture=archs[0],
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", cfg.get("qkv_bias", archs[0] == "Qwen2ForCausalLM")),
            rope_scaling=_rope_scaling(cfg),
            moe=moe_config_from_hf(cfg),
        )
    except KeyError as e:
        raise ValueError(f"config.json is missing the field {e.args[0]!r}") from None


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type") or "default"
    return None if kind == "default" else dict(rs, rope_type=kind)


def _load_hf_dir(path: Path, dtype: torch.dtype, quantization: str | None = None) -> LoadedModel:
    from safetensors import safe_open

    cfg = json.loads((path / "config.json").read_text())
    config = config_from_hf(cfg)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has config.json but no *.safetensors weights")
    if cfg.get("quantization_config") is not None:  # pre-quantized: GPTQ / AWQ (fleetlm/quantization/gptq.py)
        from fleetlm.quantization.gptq import load_prequantized

        config, prequantized = load_prequantized(cfg["quantization_config"], config, files, dtype, quantization)
        return LoadedModel(config, tokenizer_from_hf_dir(path, cfg), prequantized, "hf")

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name).to(dtype)

    return LoadedModel(config, tokenizer_from_hf_dir(path, cfg), weights(), "hf")


# -- GGUF ---------------------------------------------------------------------------------------
_GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def gguf_fields(reader: Any) -> dict[str, Any]:
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except Exception:  # noqa: BLE001 - an unreadable exotic field is skipped, not fatal
            continue
    return out


def config_from_gguf(fields: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """``shapes``: the file's tensors, name -> shape rows first (``gguf_moe.tensor_shapes``)."""
    from fleetlm.models import gguf_moe

    arch = fields.get("general.architecture")
    moe, architecture = None, _GGUF_ARCHS.get(arch)
    if gguf_moe.is_moe_gguf(fields):
        architecture, moe, dense_width = gguf_moe.moe_config_from_gguf(fields, shapes)
    elif arch not in _GGUF_ARCHS:
        supported = (*_GGUF_ARCHS, *gguf_moe.MOE_ARCHS)
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(supported)}")

    def get(key: str, default: Any = None) -> Any:
        v = fields.get(f"{arch}.{key}", default)
        if v is None:
            raise ValueError(f"GGUF metadata is missing {arch}.{key}")
        return v

    heads, hidden = get("attention.head_count"), get("embedding_length")
    rope_scaling = None
    if fields.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        rope_scaling = {
            "rope_type": fields[f"{arch}.rope.scaling.type"],
            "factor": fields.get(f"{arch}.rope.scaling.factor", 1.0),
        }
    return ModelConfig(
        architecture=architecture,
        vocab_size=fields.get(f"{arch}.vocab_size") or len(fields["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=dense_width if moe else get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=fields.get(f"{arch}.attention.key_length") or hidden // heads,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=get("context_length"),
        tie_word_embeddings="output.weight" not in shapes,
        attention_bias="blk.0.attn_q.bias" in shapes,
        rope_scaling=rope_scaling,
        moe=moe,
    )


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the row interleaving GGUF converters apply to Llama q/k projections for their RoPE."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _hf_name(gguf_name: str, architecture: str = "") -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, kind, suffix = gguf_name.split(".")
    if kind not in _GGUF_TO_HF:
        from fleetlm.models.gguf_moe import family_prefix, hf_names

        name = hf_names(gguf_name, layer, kind, family_prefix(architecture))
        if name is None:
            raise ValueError(f"GGUF tensor {gguf_name!r} is not one fleetlm knows how to load")
        return name
    return f"model.layers.{layer}.{_GGUF_TO_HF[kind]}.{suffix}"


def _load_gguf(path: Path, dtype: torch.dtype, keep_quantized: bool = False) -> LoadedModel:
    import gguf

    from fleetlm.models.gguf_moe import is_expert_kind, tensor_shapes

    reader = gguf.GGUFReader(str(path))
    fields = gguf_fields(reader)
    shapes = tensor_shapes(reader)
    config = config_from_gguf(fields, shapes)
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:  # RoPE frequency factors stored as a tensor (Llama-3.1 style scaling)
        factors = gguf.quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1)
        config = dataclasses.replace(config, rope_scaling={"rope_type": "freq_factors", "factors": tuple(float(f) for f in factors)})
    llama_permuted = fields.get("general.architecture") == "llama"
    kept, mxfp4_names = None, frozenset()
    if keep_quantized:
        from fleetlm.quantization import gguf as gq

        mxfp4_experts, mxfp4_names = _plan_mxfp4_experts(reader, config)
        kept = gq.plan_kept([t for t in reader.tensors if t.name not in mxfp4_names])
        quant = _with_mxfp4_experts(kept, mxfp4_experts)
        if quant is not None:
            config = dataclasses.replace(config, quantization=quant)

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for t in (t for t in reader.tensors if t.name != ROPE_FREQS):
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            heads = config.num_heads if kind == "attn_q" else config.num_kv_heads

            def unpermute(a: np.ndarray, kind: str = kind, heads: int = heads) -> np.ndarray:
                return _unpermute_qk(a, heads) if llama_permuted and kind in ("attn_q", "attn_k") else a

            if kept is not None and not is_expert_kind(kind):
                hf = _hf_name(t.name, config.architecture)
                if gq.is_kept(kept, hf):
                    yield from gq.kept_tensors(t, hf, unpermute)
                    continue
            if kept is not None and kept.head == "int8_group" and t.name in gq.head_names(config):
                yield from gq.head_tensors(t)
                if t.name == "output.weight":
                    continue
            if t.name in mxfp4_names:  # routed experts kept in MXFP4: their raw blocks, per expert
                yield from _mxfp4_expert_tensors(t, kind, config.architecture)
                continue
            arr = unpermute(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shapes[t.name]))
            if config.moe is not None and kind:
                yield from _moe_tensors(t.name, kind, arr, config.architecture, dtype)
                continue
            yield _hf_name(t.name), torch.from_numpy(np.array(arr, dtype=np.float32, order="C")).to(dtype)

    return LoadedModel(config, tokenizer_from_gguf_fields(fields), weights(), "gguf")


def _moe_tensors(name: str, kind: str, arr: np.ndarray, architecture: str, dtype: torch.dtype):
    """An MoE GGUF's layer tensor under its HF name(s): one per expert for a stacked one."""
    from fleetlm.models.gguf_moe import expert_slices, is_expert_kind

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32, order="C")).to(dtype)

    layer = name.split(".")[1]
    if is_expert_kind(kind):
        for hf, a in expert_slices(layer, kind, arr, architecture):
            yield hf, t(a)
    elif kind == "ffn_gate_inp_shexp":  # [hidden] in the file, a [1, hidden] linear in the model
        yield _hf_name(name, architecture), t(arr.reshape(1, -1))
    else:
        yield _hf_name(name, architecture), t(arr)


# -- GGUF MXFP4 experts (fleetlm/quantization/mxfp4.py) ------------------------------------------
def _plan_mxfp4_experts(reader: Any, config: ModelConfig) -> tuple[frozenset[str], frozenset[str]]:
    """(FusedMoE prefixes kept in MXFP4, their GGUF expert tensor names); empty for a dense model."""
    if config.moe is None:
        return frozenset(), frozenset()
    from fleetlm.quantization.mxfp4 import plan_experts

    return plan_experts(reader.tensors, config.architecture)


def _with_mxfp4_experts(kept: Any, experts: frozenset[str]) -> Any:
    from fleetlm.quantization.mxfp4 import with_experts

    return with_experts(kept, experts)


def _mxfp4_expert_tensors(t: Any, kind: str, architecture: str) -> Iterator[tuple[str, torch.Tensor]]:
    from fleetlm.quantization.mxfp4 import expert_blocks

    yield from expert_blocks(t, t.name.split(".")[1], kind, architecture)
