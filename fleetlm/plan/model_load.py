"""Build a ``ModelSpec`` from a catalog name, an HF ``config.json``, a GGUF file or a fleetlm alias.

Resolution order for ``load_model_spec(name)``: built-in catalog name, existing path
(``config.json``, a directory holding one, or a ``.gguf`` file), then fleetlm model alias
(which resolves to a cached GGUF file). GGUF files are read for metadata only (the ``gguf``
package memory-maps the file; no tensor data is touched).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any

from fleetlm.moe.config import moe_config_from_hf
from fleetlm.plan.errors import PlanError
from fleetlm.plan.model_catalog import catalog_model, catalog_names
from fleetlm.plan.model_spec import ModelSpec

_REQUIRED_HF = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def load_model_spec(model: str) -> ModelSpec:
    spec = catalog_model(model)
    if spec is not None:
        return spec
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.exists():
        return spec_from_gguf(path) if path.suffix == ".gguf" else spec_from_config_file(path)
    from fleetlm.models.hub import known_aliases, resolve_model

    if model.lower() in known_aliases():
        resolved = resolve_model(model)
        return spec_from_gguf(resolved) if resolved.suffix == ".gguf" else load_model_spec(str(resolved))
    raise PlanError(
        f"unknown model {model!r}: not a catalog name, not an existing config.json / directory / "
        f".gguf path, and not a fleetlm alias; catalog: {', '.join(catalog_names())}; "
        f"aliases: {', '.join(known_aliases())}"
    )


def spec_from_config_file(path: Path) -> ModelSpec:
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read model config {str(path)!r}: {e}") from e
    if not isinstance(cfg, dict):
        raise PlanError(f"model config {str(path)!r} is not a JSON object")
    return spec_from_config(cfg, name=Path(path).parent.name or Path(path).stem, source=str(path))


def spec_from_config(cfg: dict[str, Any], name: str = "custom", source: str = "config") -> ModelSpec:
    """An HF ``config.json`` dict (Llama, Mistral, Mixtral, Qwen2/2-MoE, Gemma-2, DeepSeek-V2/V3)."""
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the LM inside
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", "")}
    missing = [k for k in _REQUIRED_HF if k not in cfg]
    try:
        moe = moe_config_from_hf(cfg)  # the engine's own parser (fleetlm/moe/config.py)
    except ValueError as e:
        raise PlanError(f"model config {source!r}: {e}") from e
    experts = moe.num_experts if moe else 0
    if "intermediate_size" not in cfg and not (experts and "moe_intermediate_size" in cfg):
        missing.append("intermediate_size")
    if missing:
        raise PlanError(f"model config {source!r} is missing {', '.join(missing)}; a decoder "
                        f"config needs {', '.join(_REQUIRED_HF)} and intermediate_size "
                        "(or moe_intermediate_size with num_local_experts / n_routed_experts)")
    model_type = str(cfg.get("model_type", ""))
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    window, sliding_layers = _sliding(cfg, model_type, layers)
    return ModelSpec(
        name=name, hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=int(cfg.get("intermediate_size") or 0),
        vocab_size=int(cfg["vocab_size"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type.startswith("gemma"))),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
        qkv_bias=bool(cfg.get("attention_bias", model_type.startswith("qwen2"))),
        gated_mlp=model_type not in ("gpt2", "gpt_neox", "opt", "phi"),
        norms_per_layer=4 if model_type in ("gemma2", "gemma3", "gemma3_text") else 2,
        num_experts=experts, num_experts_per_tok=moe.top_k if moe else 0,
        moe_intermediate_size=moe.moe_intermediate_size if moe else 0,
        num_shared_experts=moe.num_shared_experts if moe else 0,
        shared_expert_intermediate_size=moe.shared_expert_intermediate_size if moe else 0,
        shared_expert_gate=bool(moe and moe.shared_expert_gate),
        num_dense_layers=moe.num_dense_layers(layers) if moe else 0,
        sliding_window=window, num_sliding_layers=sliding_layers,
        q_lora_rank=int(cfg.get("q_lora_rank") or 0), kv_lora_rank=int(cfg.get("kv_lora_rank") or 0),
        qk_nope_head_dim=int(cfg.get("qk_nope_head_dim") or 0),
        qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0),
        v_head_dim=int(cfg.get("v_head_dim") or 0), source=source,
    )


def _sliding(cfg: dict[str, Any], model_type: str, layers: int) -> tuple[int | None, int]:
    """(window, number of sliding-window layers) from the several ways configs say it."""
    window = cfg.get("sliding_window")
    if not window or (model_type.startswith("qwen") and not cfg.get("use_sliding_window")):
        return None, 0
    if isinstance(cfg.get("layer_types"), list):
        n = sum(1 for t in cfg["layer_types"] if t == "sliding_attention")
        return (int(window), n) if n else (None, 0)
    if model_type == "gemma2":  # even layers local, odd layers global
        return int(window), (layers + 1) // 2
    if model_type.startswith("qwen"):  # layers from max_window_layers on use the window
        return int(window), max(0, layers - int(cfg.get("max_window_layers", layers)))
    return int(window), layers


def _field(fields: dict[str, Any], key: str, default: Any = None) -> Any:
    f = fields.get(key)
    return default if f is None else f.contents()


def spec_from_gguf(path: Path | str) -> ModelSpec:
    """Architecture numbers and exact weight bytes from a GGUF file's metadata and tensor table.

    Cached per (path, size, mtime): ``GGUFReader`` takes ~2 s to index a tokenizer's arrays.
    Raises ``PlanError`` for a file that is not GGUF or lacks the architecture keys.
    """
    p = Path(path).resolve()
    st = p.stat()
    return _spec_from_gguf(str(p), st.st_size, st.st_mtime_ns)


def gguf_reader(path: Path | str):
    """A (cached) ``gguf.GGUFReader``: metadata and tensor table, tensor data memory-mapped."""
    p = Path(path).resolve()
    st = p.stat()
    return _gguf_reader(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _gguf_reader(path: str, size: int, mtime_ns: int):
    import gguf  # lazy: pulls numpy

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is bad input
        raise PlanError(f"cannot read GGUF file {path!r}: {e}") from e


@functools.lru_cache(maxsize=8)
def _spec_from_gguf(path: str, size: int, mtime_ns: int) -> ModelSpec:
    reader = _gguf_reader(path, size, mtime_ns)
    f = reader.fields
    arch = _field(f, "general.architecture")
    if not arch:
        raise PlanError(f"GGUF file {str(path)!r} has no general.architecture")
    keys = {"block_count": "num_layers", "embedding_length": "hidden_size",
            "attention.head_count": "num_heads"}
    values = {name: _field(f, f"{arch}.{k}") for k, name in keys.items()}
    missing = [f"{arch}.{k}" for k, name in keys.items() if values[name] is None]
    vocab = _field(f, f"{arch}.vocab_size") or len(_field(f, "tokenizer.ggml.tokens", []) or [])
    ffn = _field(f, f"{arch}.feed_forward_length")
    if not vocab:
        missing.append(f"{arch}.vocab_size")
    if ffn is None:
        missing.append(f"{arch}.feed_forward_length")
    if missing:
        raise PlanError(f"GGUF file {str(path)!r} lacks metadata {', '.join(missing)}")
    h, heads = int(values["hidden_size"]), int(values["num_heads"])
    names = {t.name for t in reader.tensors}
    kinds = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    window = _field(f, f"{arch}.attention.sliding_window")
    moe = _gguf_moe(f, arch, reader)
    return ModelSpec(
        name=Path(path).stem, hidden_size=h, num_layers=int(values["num_layers"]),
        num_heads=heads, num_kv_heads=int(_field(f, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(f, f"{arch}.attention.key_length", h // heads)),
        intermediate_size=int(ffn), vocab_size=int(vocab),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(_field(f, f"{arch}.context_length", 0)),
        qkv_bias="blk.0.attn_q.bias" in names,
        num_experts=moe.num_experts if moe else 0, num_experts_per_tok=moe.top_k if moe else 0,
        moe_intermediate_size=moe.moe_intermediate_size if moe else 0,
        num_shared_experts=moe.num_shared_experts if moe else 0,
        shared_expert_intermediate_size=moe.shared_expert_intermediate_size if moe else 0,
        shared_expert_gate=bool(moe and moe.shared_expert_gate),
        num_dense_layers=moe.num_dense_layers(int(values["num_layers"])) if moe else 0,
        sliding_window=int(window) if window else None,
        num_sliding_layers=int(values["num_layers"]) if window else 0,
        source=str(path), native_weight_format=kinds.most_common(1)[0][0] if kinds else None,
        native_weights_bytes=int(sum(int(t.n_bytes) for t in reader.tensors)),
    )


def _gguf_moe(f, arch: str, reader):
    """The engine's own reading of an MoE GGUF (``models/gguf_moe.py``), or None when dense."""
    from fleetlm.models import gguf_moe

    fields = {k: _field(f, k) for k in f if k == "general.architecture" or k.startswith(arch + ".")}
    if not gguf_moe.is_moe_gguf(fields):
        return None
    try:
        return gguf_moe.moe_config_from_gguf(fields, gguf_moe.tensor_shapes(reader))[1]
    except ValueError as e:
        raise PlanError(str(e)) from None
