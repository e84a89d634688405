"""GGUF quantized tensors kept quantized, each type mapped exactly into one of our methods:

| GGUF | ours | group | mapping |
|---|---|---|---|
| Q4_0 | int4 (``w = (q - 8) * scale + zero``) | 32 | scale ``d``, zero 0 |
| Q4_1 | int4 | 32 | scale ``d``, zero ``m + 8 d`` |
| Q4_K | int4 | 32 (its sub-blocks) | scale ``d sc_j``, zero ``8 d sc_j - dmin m_j`` |
| Q8_0 | group-wise int8 (``w = q * scale[group]``) | 32 | scale ``d`` |
| Q6_K | group-wise int8 | 16 (its sub-blocks) | code ``q - 32``, scale ``d sc_j`` |
| MXFP4 | MXFP4 (``quantization/mxfp4.py``) | 32 | E2M1 codes and E8M0 exponents as shipped |

ggml block layouts (``ggml-common.h``, ``dequantize_row_*`` in ``ggml-quants.c``):

- Q4_0 (32 weights, 18 B): fp16 ``d``, 16 bytes of nibbles; weight ``j`` is the low nibble of
  byte ``j`` and weight ``j + 16`` its high nibble; ``w = (q - 8) * d``.
- Q4_1 (32 weights, 20 B): fp16 ``d``, fp16 ``m``, nibbles as Q4_0; ``w = q * d + m``.
- Q8_0 (32 weights, 34 B): fp16 ``d``, 32 int8; ``w = q * d``.
- Q4_K (256 weights, 144 B): fp16 ``d``, fp16 ``dmin``, 12 bytes of 6-bit scales ``sc_j`` and mins
  ``m_j`` of its 8 sub-blocks of 32 (``get_scale_min_k4``: bytes 0-3 hold ``sc_0..3`` in their
  low 6 bits, bytes 4-7 ``m_0..3``; ``sc_4..7`` / ``m_4..7`` are the low / high nibbles of bytes
  8-11 plus, as bits 4-5, the top two bits of bytes 0-3 / 4-7), 128 bytes of nibbles in 4 chunks of
  32 bytes: chunk ``c``'s low nibbles are sub-block ``2c``, its high nibbles sub-block ``2c + 1``;
  ``w = d sc_j q - dmin m_j``.
- Q6_K (256 weights, 210 B): 128 bytes ``ql`` (low 4 bits), 64 bytes ``qh`` (high 2 bits), 16 int8
  scales of its sub-blocks of 16, fp16 ``d``; per half ``h`` of 128 weights, weight ``32 i + l``
  (``i`` < 4, ``l`` < 32) takes nibble ``i // 2`` of ``ql[64 h + 32 (i % 2) + l]`` and bits ``2 i``
  of ``qh[32 h + l]``; ``w = d sc_j (q - 32)``.

Codes and scales are exact (fp16 times a 6- or 8-bit integer fits fp32); a Q4_1 / Q4_K zero adds
one fp32 rounding. On the CPU the int4 kernel holds scale and zero in the activation dtype (bf16
rounds them to 8 mantissa bits). Every other type (F32, F16, Q5_K, ...) is dequantized at load as
before, with one logged notice per type. A merged layer (q/k/v, gate/up) stays quantized only when
all its parts share one kept type (Q4_K_M files often give ``attn_v`` Q6_K beside a Q4_K ``attn_q``
/ ``attn_k``: that qkv layer is dequantized, and logged). The token embedding is dequantized
(lookups). The LM head computes through a Q8_0 or Q6_K output matrix (or tied embedding) as
shipped, with the group-wise int8 method; any other head through an int8 per-row copy.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from fleetlm.layers.linear import LinearMethod
from fleetlm.quantization.base import QuantConfig

logger = logging.getLogger("fleetlm")
# GGUF type -> (our method, its group size in input weights)
METHODS = {"Q4_0": ("int4", 32), "Q4_1": ("int4", 32), "Q4_K": ("int4", 32),
           "Q8_0": ("int8_group", 32), "Q6_K": ("int8_group", 16), "MXFP4": ("mxfp4", 32)}
KEPT_TYPES = tuple(METHODS)
HEAD_TYPES = ("Q8_0", "Q6_K")  # an output matrix of these types computes as shipped
# GGUF type -> (weights, bytes) per block
_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q6_K": (256, 210),
           "MXFP4": (32, 17)}
_MERGED = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv",
           "ffn_gate": "ffn_gate_up", "ffn_up": "ffn_gate_up"}
_OURS = {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}


@dataclass(frozen=True)
class GGUFQuantConfig(QuantConfig):
    """Which of our linear layers keep which GGUF type (``model.layers.3.mlp.down_proj`` -> Q4_K)."""

    kept: dict[str, str] = field(default_factory=dict, hash=False)
    head: str = "int8"  # "int8_group": the output matrix is Q8_0 / Q6_K and loads as shipped
    head_group: int = 32  # the int8_group head's group size: 32 (Q8_0) or 16 (Q6_K)
    dequantized: tuple[str, ...] = ()  # linear layers dequantized at load (mixed or other types)
    name: str = "gguf"

    def linear_method(self, prefix: str) -> LinearMethod | None:
        kind = self.kept.get(prefix)
        if kind is None:
            return None
        method, group = METHODS[kind]
        if method == "mxfp4":  # codes and exponents as shipped (quantization/mxfp4.py)
            from fleetlm.quantization.mxfp4 import MXFP4LinearMethod

            return MXFP4LinearMethod()
        if method == "int8_group":
            from fleetlm.quantization.int8_group import Int8GroupLinearMethod

            return Int8GroupLinearMethod(group)
        from fleetlm.quantization.int4 import Int4LinearMethod

        return Int4LinearMethod(group, prequantized=True)

    def lm_head(self) -> str:
        return "int8_group16" if self.head == "int8_group" and self.head_group == 16 else self.head

    def describe(self) -> str:
        kinds = sorted(set(self.kept.values()))
        out = f"gguf ({', '.join(kinds) or 'no layers'} kept quantized in {len(self.kept)} layers"
        return out + (f"; {len(self.dequantized)} dequantized)" if self.dequantized else ")")


def plan_kept(tensors: list) -> GGUFQuantConfig | None:
    """Decide, from the file's tensor table, which linear layers stay quantized (None: none do,
    and the model loads unquantized as before)."""
    parts: dict[str, set[str]] = defaultdict(set)
    for t in tensors:
        bits = t.name.split(".")
        if len(bits) == 4 and bits[0] == "blk" and bits[3] == "weight" and bits[2] in (*_MERGED, *_OURS):
            parts[f"{bits[1]}.{_MERGED.get(bits[2], bits[2])}"].add(t.tensor_type.name)
    kept, dequantized = {}, []
    mixed: dict[tuple[str, str], list[int]] = defaultdict(list)  # (layer kind, types) -> layer numbers
    for key, types in parts.items():
        layer, kind = key.split(".")
        ours = f"model.layers.{layer}.{_OURS[kind]}"
        if len(types) == 1 and (t := next(iter(types))) in KEPT_TYPES:
            kept[ours] = t
            continue
        dequantized.append(ours)
        if len(types) > 1 and types & set(KEPT_TYPES):
            mixed[(_OURS[kind], " + ".join(sorted(types)))].append(int(layer))
    notices = sorted({t.tensor_type.name for t in tensors} - set(KEPT_TYPES) - {"F32"})
    if notices:
        logger.info("GGUF: %s tensors are dequantized at load (kept quantized: %s)", ", ".join(notices),
                    ", ".join(KEPT_TYPES))
    if mixed:
        logger.info("GGUF: %d merged layers are dequantized at load, since their parts differ in type "
                    "(a merged layer stays quantized only when all its parts share one kept type): %s",
                    sum(map(len, mixed.values())),
                    "; ".join(f"{kind} ({types}) in layers {', '.join(map(str, sorted(ls)))}"
                              for (kind, types), ls in sorted(mixed.items())))
    names = {t.name: t.tensor_type.name for t in tensors}
    head = names.get("output.weight", names.get("token_embd.weight"))
    if not kept and head not in HEAD_TYPES:
        return None
    if head in HEAD_TYPES:
        return GGUFQuantConfig(kept, "int8_group", METHODS[head][1], tuple(sorted(dequantized)))
    return GGUFQuantConfig(kept, "int8", 32, tuple(sorted(dequantized)))


def is_kept(cfg: GGUFQuantConfig, hf_name: str) -> bool:
    """Whether checkpoint tensor ``hf_name`` (``...q_proj.weight``) belongs to a kept layer."""
    for hf, ours in ((".q_proj.", ".qkv_proj."), (".k_proj.", ".qkv_proj."), (".v_proj.", ".qkv_proj."),
                     (".gate_proj.", ".gate_up_proj."), (".up_proj.", ".gate_up_proj.")):
        hf_name = hf_name.replace(hf, ours)
    return hf_name.endswith(".weight") and hf_name[: -len(".weight")] in cfg.kept


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes on the last axis -> their fp16 value as fp32 (last axis dropped)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def decode_blocks(raw: np.ndarray, kind: str, rows: int, cols: int) -> dict[str, np.ndarray]:
    """Raw block bytes [rows, cols / block weights * block bytes] -> ``qweight`` [rows, cols]
    (uint8 0..15 for the int4 types, int8 for Q8_0 / Q6_K) and per-group ``scales`` (and ``zeros``
    for the int4 types) [rows, cols / group] fp32, in our conventions (groups: ``METHODS``)."""
    if kind == "MXFP4":
        from fleetlm.quantization.mxfp4 import decode_blocks as mxfp4_blocks

        codes, exponents = mxfp4_blocks(raw, rows, cols)
        return {"qweight": codes.numpy(), "scales": exponents.numpy()}
    weights, size = _BLOCKS[kind]
    nb = cols // weights
    b = np.asarray(raw, dtype=np.uint8).reshape(rows, nb, size)
    if kind == "Q8_0":
        return {"qweight": b[..., 2:].copy().view(np.int8).reshape(rows, cols), "scales": _f16(b[..., :2])}
    if kind == "Q4_K":
        return _decode_q4_k(b, rows, cols)
    if kind == "Q6_K":
        return _decode_q6_k(b, rows, cols)
    d = _f16(b[..., :2])
    nib = b[..., size - 16 :]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).reshape(rows, cols)
    if kind == "Q4_0":
        zero = np.zeros_like(d)
    else:
        zero = _f16(b[..., 2:4]) + 8.0 * d
    return {"qweight": q, "scales": d, "zeros": zero}


def _decode_q4_k(b: np.ndarray, rows: int, cols: int) -> dict[str, np.ndarray]:
    nb = b.shape[1]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [rows, nb]
    packed = b[..., 4:16].reshape(rows, nb, 3, 4)
    lo, hi, mix = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 6) << 4)], axis=-1)  # [rows, nb, 8]
    mn = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 6) << 4)], axis=-1)
    qs = b[..., 16:].reshape(rows, nb, 4, 1, 32)  # 4 chunks of 64 weights: low nibbles, then high
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(rows, cols)
    scale = (d[..., None] * sc.astype(np.float32)).reshape(rows, nb * 8)
    offset = (dmin[..., None] * mn.astype(np.float32)).reshape(rows, nb * 8)
    return {"qweight": q, "scales": scale, "zeros": 8.0 * scale - offset}


def _decode_q6_k(b: np.ndarray, rows: int, cols: int) -> dict[str, np.ndarray]:
    nb = b.shape[1]
    ql = b[..., :128].reshape(rows, nb, 2, 1, 2, 32)  # half, nibble, 32-byte chunk, byte
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=3).reshape(rows, nb, 2, 4, 32)  # i = 2 nibble + chunk
    qh = b[..., 128:192].reshape(rows, nb, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 0x03  # [rows, nb, 2, 4, 32]
    q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8).reshape(rows, cols)
    sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)  # [rows, nb, 16]
    scale = (_f16(b[..., 208:210])[..., None] * sc).reshape(rows, nb * 16)
    return {"qweight": q, "scales": scale}


def head_tensors(t) -> list[tuple[str, torch.Tensor]]:
    """A Q8_0 / Q6_K output matrix (or tied embedding) as the LM head's codes and block scales."""
    return kept_tensors(t, "lm_head.weight", lambda a: a)


def kept_tensors(t, hf_name: str, unpermute) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs a kept GGUF tensor loads as: ``X.qweight``, ``X.scales``[, ``X.zeros``]."""
    rows, cols = (int(x) for x in reversed(t.shape.tolist()))
    parts = decode_blocks(np.asarray(t.data), t.tensor_type.name, rows, cols)
    base = hf_name[: -len(".weight")]
    return [(f"{base}.{k}", torch.from_numpy(np.ascontiguousarray(unpermute(v)))) for k, v in parts.items()]


def head_names(config) -> tuple[str, ...]:
    """The GGUF tensor the LM head computes with: the output matrix, or the tied embedding."""
    return ("token_embd.weight",) if config.tie_word_embeddings else ("output.weight",)
