"""Hugging Face GPTQ and AWQ int4 checkpoints, loaded into the int4 method (``int4.py``) as
codes, scales and zeros in its convention ``w = (q - 8) * scale + zero``.

A checkpoint is a Hugging Face directory whose ``config.json`` has a ``quantization_config`` with
``quant_method`` ``"gptq"`` or ``"awq"``. Each quantized linear layer ``X`` ships, with ``in``
input and ``out`` output features and ``G = in / group_size`` groups:

- GPTQ: ``X.qweight`` int32 [in / 8, out], 8 codes per int32 along the input, low nibble first;
  ``X.qzeros`` int32 [G, out / 8], 8 zero points per int32 along the output, low nibble first;
  ``X.scales`` fp16 [G, out]; ``X.g_idx`` int32 [in], the group of each input column.
  ``w[o, k] = scales[g, o] * (q[k, o] - z[g, o])`` with ``g = g_idx[k]``. ``checkpoint_format``
  ``"gptq"`` (the classic one) stores ``z - 1``; ``"gptq_v2"`` stores ``z``. Without act order
  (``desc_act`` false) ``g_idx[k] = k // group_size``; with it, ``g_idx`` is any assignment.
- AWQ (``version`` ``"gemm"``): ``X.qweight`` int32 [in, out / 8] and ``X.qzeros`` int32
  [G, out / 8], both packed along the output with nibble ``i`` holding column ``8 c + [0, 2, 4,
  6, 1, 3, 5, 7][i]``; ``X.scales`` fp16 [G, out]; ``w = scales * (q - z)``, groups in order.

Both become ``X.qweight`` uint8 [out, in], ``X.scales`` and ``X.zeros`` fp32 [out, G] with
``zero = scale * (8 - z)``, so ``(q - 8) * scale + zero = scale * (q - z)``. That is exact in
fp32: an fp16 scale times an integer in [-16, 16] fits in fp32's mantissa, and so does the sum.
The layers' own ``weight_loader`` s then keep each TP rank's slice, as for GGUF Q4 tensors
(merged q/k/v and gate/up layers assemble from their parts).

Act order (GPTQ ``desc_act``): ``ActOrderInt4LinearMethod`` also loads ``g_idx``. Each rank sorts
its input columns by group and pads every group to whole kernel groups with zero-weight columns,
and ``apply`` gathers ``x`` into that order. GPTQ's act order puts exactly ``group_size`` columns
in each group, so at TP = 1 (and in column-parallel layers at any TP) nothing is padded: the gather
is a permutation. A row-parallel rank's slice can cut groups apart; it holds every group's scales
and pads (at worst TP times its codes).

Per output channel (``group_size`` -1) is held as groups of 32 sharing the row's scale and zero.
A layer left unquantized (``modules_to_not_convert``, or a merged layer whose parts are not all
quantized) loads as a full-precision ``weight``, its quantized parts dequantized at load; so does a
quantized LM head. Refused with a ``ValueError`` naming the field and the accepted values: bits
other than 4, group sizes other than 32/64/128/-1, GPTQ formats other than ``gptq``/``gptq_v2``
(``marlin``, ``bitblas``, ...), AWQ versions other than ``gemm`` (``gemv``, ``gemv_fast``,
``marlin``, ``exllama``, ...), AWQ without zero points, per-module ``dynamic`` overrides, and
mixture-of-experts models.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fleetlm.layers.linear import LinearMethod
from fleetlm.quantization.act_order import ActOrderInt4LinearMethod
from fleetlm.quantization.base import QuantConfig
from fleetlm.quantization.int4 import Int4LinearMethod

logger = logging.getLogger("fleetlm")

QUANT_METHODS = ("gptq", "awq")
GROUP_SIZES = (32, 64, 128, -1)
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)
PER_CHANNEL_GROUP = 32  # group_size -1: the row's scale and zero repeated over groups of 32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds output column 8 c + AWQ_ORDER[i]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
# our layer -> its checkpoint parts (a merged layer is quantized only when all its parts are)
_PARTS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "self_attn.o_proj": ("self_attn.o_proj",),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
          "mlp.down_proj": ("mlp.down_proj",)}
_OURS = {part: ours for ours, parts in _PARTS.items() for part in parts}
_QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


# -- quantization_config ------------------------------------------------------------------------
@dataclass(frozen=True)
class HFInt4Config(QuantConfig):
    """A GPTQ or AWQ checkpoint: which of our linear layers hold int4 codes, in which groups."""

    name: str  # "gptq" or "awq"
    group_size: int  # as in the checkpoint; -1: one group per output row
    desc_act: bool = False  # GPTQ act order: the groups come from g_idx
    sym: bool = True
    checkpoint_format: str = "gptq"  # GPTQ: "gptq" (zeros stored minus one) or "gptq_v2"; AWQ: "gemm"
    modules_to_not_convert: tuple[str, ...] = ()
    quantized: frozenset[str] = field(default=frozenset(), hash=False, repr=False)  # model.layers.3.mlp.down_proj

    @property
    def kernel_group(self) -> int:
        return PER_CHANNEL_GROUP if self.group_size == -1 else self.group_size

    @property
    def act_order(self) -> bool:
        return self.desc_act and self.group_size != -1

    def linear_method(self, prefix: str) -> LinearMethod | None:
        if prefix not in self.quantized:
            return None
        if self.act_order:
            return ActOrderInt4LinearMethod(self.kernel_group)
        return Int4LinearMethod(self.kernel_group, prequantized=True)

    def lm_head(self) -> str | None:
        return None  # the checkpoint's head is full precision (a quantized one is dequantized at load)

    def describe(self) -> str:
        group = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        act = ", act order" if self.act_order else ""
        return f"{self.name} (int4, {group}{act}; {len(self.quantized)} linear layers kept quantized)"


def _choice(field_name: str, value: Any, accepted: tuple, method: str) -> Any:
    if value not in accepted:
        raise ValueError(f"quantization_config.{field_name} {value!r} is not supported for {method} "
                         f"checkpoints; accepted: {', '.join(map(repr, accepted))}")
    return value


def _get(qc: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in qc and qc[k] is not None:
            return qc[k]
    return default


def parse_quantization_config(qc: dict[str, Any]) -> HFInt4Config:
    """``config.json``'s ``quantization_config`` -> an ``HFInt4Config`` (no layers planned yet);
    a ``ValueError`` naming the field and the accepted values for anything else."""
    if not isinstance(qc, dict):
        raise ValueError(f"config.json quantization_config must be an object, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    _choice("quant_method", method, QUANT_METHODS, "fleetlm")
    _choice("bits", _get(qc, "bits", "w_bit", default=4), (4,), method)
    group = _choice("group_size", _get(qc, "group_size", "q_group_size", default=128), GROUP_SIZES, method)
    skip = _get(qc, "modules_to_not_convert", default=())
    if isinstance(skip, str) or not all(isinstance(m, str) for m in skip):
        raise ValueError(f"quantization_config.modules_to_not_convert must be a list of module names, got {skip!r}")
    if method == "awq":
        version = str(_get(qc, "version", default="gemm")).lower()
        _choice("version", version, AWQ_VERSIONS, method)
        _choice("backend", str(_get(qc, "backend", default="autoawq")).lower(), ("autoawq",), method)
        _choice("zero_point", _get(qc, "zero_point", default=True), (True,), method)
        return HFInt4Config("awq", group, checkpoint_format=version, sym=False, modules_to_not_convert=tuple(skip))
    if qc.get("is_marlin_format"):
        raise ValueError("quantization_config.is_marlin_format true: a Marlin-repacked GPTQ checkpoint is not "
                         f"supported; accepted: checkpoint_format {', '.join(map(repr, GPTQ_FORMATS))}")
    fmt = _choice("checkpoint_format", str(_get(qc, "checkpoint_format", default="gptq")).lower(), GPTQ_FORMATS,
                  method)
    if qc.get("dynamic"):
        raise ValueError("quantization_config.dynamic (per-module bits / group overrides) is not supported; "
                         "accepted: absent or empty")
    return HFInt4Config("gptq", group, desc_act=bool(qc.get("desc_act", False)), sym=bool(qc.get("sym", True)),
                        checkpoint_format=fmt,
                        modules_to_not_convert=tuple(skip))


def _excluded(cfg: HFInt4Config, hf_module: str) -> bool:
    return any(m in hf_module for m in cfg.modules_to_not_convert)  # as transformers matches them


def plan_layers(cfg: HFInt4Config, names: set[str]) -> HFInt4Config:
    """The config with ``quantized`` filled from the checkpoint's tensor names: a layer of ours is
    int4 when every part of it ships ``qweight`` and none is in ``modules_to_not_convert``."""
    layers = {n.split(".")[2] for n in names if n.startswith("model.layers.") and n.count(".") >= 3}
    kept = set()
    for i in layers:
        for ours, parts in _PARTS.items():
            hf = [f"model.layers.{i}.{p}" for p in parts]
            if all(f"{h}.qweight" in names and not _excluded(cfg, h) for h in hf):
                kept.add(f"model.layers.{i}.{ours}")
    return dataclasses.replace(cfg, quantized=frozenset(kept))


# -- repacking ------------------------------------------------------------------------------------
def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> its 8 nibbles [..., C, 8], nibble i from bits 4i .. 4i+3."""
    return ((packed.to(torch.int32)[..., None] >> _SHIFTS) & 0xF).to(torch.uint8)


def unpack_along_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] packed along dim 0 (row r holds rows 8r .. 8r+7) -> uint8 [8R, C]."""
    r, c = packed.shape
    return _nibbles(packed).permute(0, 2, 1).reshape(r * 8, c)


def unpack_along_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, C] packed along dim 1 -> uint8 [R, 8C]; ``order[i]``: the column (within its 8)
    that nibble i holds (None: nibble i holds column i)."""
    r, c = packed.shape
    n = _nibbles(packed)
    if order is not None:
        n = n[..., [order.index(j) for j in range(8)]]
    return n.reshape(r, c * 8)


def _check_shape(what: str, t: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != want:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {want}")


def _groups(name: str, group_size: int, in_features: int) -> int:
    if group_size == -1:
        return 1
    if in_features % group_size:
        raise ValueError(f"{name}: quantization_config.group_size {group_size} does not divide the layer's "
                         f"{in_features} input features")
    return in_features // group_size


def _ours(scales: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, out] scales and integer zero points -> our [out, G] fp32 scales and zeros."""
    s = scales.float()
    return s.t().contiguous(), (s * (8.0 - z.float())).t().contiguous()


def repack_gptq(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                group_size: int, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """A GPTQ layer -> ``qweight`` uint8 [out, in], ``scales`` / ``zeros`` fp32 [out, G], G the
    checkpoint's groups (indexed by ``g_idx``, which is loaded as it is)."""
    in_features, out = qweight.shape[0] * 8, qweight.shape[1]
    g = _groups(name, group_size, in_features)
    _check_shape(f"{name}.scales", scales, (g, out))
    _check_shape(f"{name}.qzeros", qzeros, (g, out // 8))
    if out % 8:
        raise ValueError(f"{name}: {out} output features, not a multiple of 8 as GPTQ packing needs")
    z = unpack_along_cols(qzeros).to(torch.int32)
    if checkpoint_format == "gptq":  # the classic format stores z - 1
        z = z + 1
    s, zero = _ours(scales, z)
    return {"qweight": unpack_along_rows(qweight).t().contiguous(), "scales": s, "zeros": zero}


def repack_awq(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> dict[str, torch.Tensor]:
    """An AWQ (GEMM) layer -> ``qweight`` uint8 [out, in], ``scales`` / ``zeros`` fp32 [out, G]."""
    in_features, out = qweight.shape[0], qweight.shape[1] * 8
    g = _groups(name, group_size, in_features)
    _check_shape(f"{name}.scales", scales, (g, out))
    _check_shape(f"{name}.qzeros", qzeros, (g, out // 8))
    s, zero = _ours(scales, unpack_along_cols(qzeros, AWQ_ORDER))
    return {"qweight": unpack_along_cols(qweight, AWQ_ORDER).t().contiguous(), "scales": s, "zeros": zero}


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The ``g_idx`` of a checkpoint without act order."""
    return torch.arange(in_features) // (in_features if group_size == -1 else group_size)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Our [out, in] codes and [out, G] scales / zeros (input column k in group ``g_idx[k]``,
    default ``k // (in / G)``) -> the fp32 weight."""
    in_features = qweight.shape[1]
    if g_idx is None:
        g_idx = trivial_g_idx(in_features, in_features // scales.shape[1])
    g_idx = g_idx.long()
    return (qweight.float() - 8.0) * scales[:, g_idx].float() + zeros[:, g_idx].float()


def per_channel_to_groups(t: torch.Tensor, in_features: int, name: str) -> torch.Tensor:
    """[out, 1] per-row scales or zeros -> [out, in / 32], the row's value for every group of 32."""
    if in_features % PER_CHANNEL_GROUP:
        raise ValueError(f"{name}: a per-channel (group_size -1) layer is held in groups of {PER_CHANNEL_GROUP}, "
                         f"which do not divide its {in_features} input features")
    return t.expand(-1, in_features // PER_CHANNEL_GROUP).contiguous()


def repack(cfg: HFInt4Config, name: str, get) -> dict[str, torch.Tensor]:
    """Layer ``name``'s tensors (``get(suffix)`` reads ``name + suffix``) in our convention:
    ``qweight``, ``scales``, ``zeros`` (and ``g_idx`` for act order), ready for the int4 method."""
    if cfg.name == "awq":
        out = repack_awq(name, get(".qweight"), get(".qzeros"), get(".scales"), cfg.group_size)
    else:
        out = repack_gptq(name, get(".qweight"), get(".qzeros"), get(".scales"), cfg.group_size,
                          cfg.checkpoint_format)
    in_features = out["qweight"].shape[1]
    if cfg.name == "gptq":
        g_idx = get(".g_idx", optional=True)
        if g_idx is not None:
            _check_shape(f"{name}.g_idx", g_idx, (in_features,))
        if cfg.act_order:
            if g_idx is None:
                raise ValueError(f"{name}.g_idx is missing, which quantization_config.desc_act true needs")
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= out["scales"].shape[1]:
                raise ValueError(f"{name}.g_idx names groups outside 0 .. {out['scales'].shape[1] - 1}")
            out["g_idx"] = g_idx.to(torch.int32)
        elif g_idx is not None and not torch.equal(g_idx.long(), trivial_g_idx(in_features, cfg.group_size)):
            raise ValueError(f"{name}.g_idx is not arange(in) // group_size, but quantization_config.desc_act "
                             "is false; accepted: desc_act true for act-order checkpoints")
    if cfg.group_size == -1:
        out["scales"] = per_channel_to_groups(out["scales"], in_features, name)
        out["zeros"] = per_channel_to_groups(out["zeros"], in_features, name)
    return out


# -- loading a checkpoint ---------------------------------------------------------------------------
def _hf_part(name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj`` (None for other tensors)."""
    bits = name.split(".")
    return ".".join(bits[3:5]) if len(bits) == 6 and bits[:2] == ["model", "layers"] else None


def load_prequantized(qc: dict[str, Any], config, files: list[Path], dtype: torch.dtype,
                      quantization: str | None):
    """(config with ``quantization`` set, weights iterator) for a directory whose config.json has
    ``quantization_config``. ``quantization``: None or the checkpoint's own method keeps it int4;
    ``"dequantize"`` loads full-precision weights; anything else is a ValueError."""
    from safetensors import safe_open

    cfg = parse_quantization_config(qc)
    if quantization not in (None, cfg.name, "dequantize"):
        raise ValueError(f"quantization {quantization!r} was asked for, but this checkpoint is already quantized "
                         f"({cfg.name}, config.json quantization_config); accepted: None or {cfg.name!r} (load as "
                         "shipped) or 'dequantize' (full precision)")
    if config.moe is not None:
        raise ValueError(f"a {cfg.name.upper()} mixture-of-experts checkpoint is not supported yet (its experts "
                         "would load into the int4 method); accepted: dense Llama / Qwen2 / Mistral checkpoints")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            where.update((n, f) for n in st.keys())
    cfg = plan_layers(cfg, set(where))
    keep = quantization != "dequantize"
    if keep:
        config = dataclasses.replace(config, quantization=cfg)
    no_bias = {"self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    if not config.attention_bias:
        no_bias |= {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    dequantized: set[str] = set()

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        with ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
            for f in files:
                for name in handles[f].keys():
                    if name.endswith(_QUANT_SUFFIXES[1:]) and f"{name.rsplit('.', 1)[0]}.qweight" in where:
                        continue  # read with its qweight
                    if not name.endswith(".qweight"):
                        t = handles[f].get_tensor(name)
                        if name.endswith(".bias") and _hf_part(name) in no_bias and not t.any():
                            continue  # a zero bias some GPTQ exporters add to layers without one
                        yield name, t.to(dtype)
                        continue
                    base = name[: -len(".qweight")]

                    def get(suffix: str, optional: bool = False, base: str = base) -> torch.Tensor | None:
                        if base + suffix not in where:
                            if optional:
                                return None
                            raise ValueError(f"{base}{suffix} is missing from the {cfg.name.upper()} checkpoint")
                        return handles[where[base + suffix]].get_tensor(base + suffix)

                    parts = repack(cfg, base, get)
                    part = _hf_part(name)
                    ours = f"{base.rsplit('.', 2)[0]}.{_OURS[part]}" if part in _OURS else None
                    if keep and ours in cfg.quantized:
                        yield from ((f"{base}.{k}", v) for k, v in parts.items())
                        continue
                    dequantized.add(base)
                    w = dequantize(parts["qweight"], parts["scales"], parts["zeros"], parts.get("g_idx"))
                    yield f"{base}.weight", w.to(dtype)
        if dequantized and keep:
            logger.info("%s: %d quantized tensors outside the int4 layers were dequantized at load (%s ...)",
                        cfg.name.upper(), len(dequantized), sorted(dequantized)[0])

    return config, weights()
