"""GGUF quantized tensors kept quantized: Q4_0 and Q4_1 repacked into the int4 method (groups
of 32, ``w = (q - 8) * scale + zero``), Q8_0 into the group-wise int8 method.

ggml block layouts (``ggml-common.h``), 32 weights per block:

- Q4_0 (18 B): fp16 ``d``, 16 bytes of nibbles; weight ``j`` is the low nibble of byte ``j`` and
  weight ``j + 16`` its high nibble; ``w = (q - 8) * d`` -> scale ``d``, zero 0.
- Q4_1 (20 B): fp16 ``d``, fp16 ``m``, nibbles as Q4_0; ``w = q * d + m`` -> scale ``d``, zero
  ``m + 8 d``.
- Q8_0 (34 B): fp16 ``d``, 32 int8; ``w = q * d``.

Codes and scales are exact; on the CPU the int4 kernel holds scale and zero in the activation
dtype (bf16 rounds the fp16 ``d`` and ``m`` to 8 mantissa bits). Every other type (F32, F16,
Q4_K, Q6_K, ...) is dequantized at load as before, with one logged notice per type. A merged layer
(q/k/v, gate/up) stays quantized only when all its parts share one kept type. The token
embedding is dequantized (lookups), and the LM head computes through an int8 per-row copy.
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
KEPT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
BLOCK = 32
_MERGED = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv",
           "ffn_gate": "ffn_gate_up", "ffn_up": "ffn_gate_up"}
_OURS = {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}


@dataclass(frozen=True)
class GGUFQuantConfig(QuantConfig):
    """Which of our linear layers keep which GGUF type (``model.layers.3.mlp.down_proj`` -> Q4_1)."""

    kept: dict[str, str] = field(default_factory=dict, hash=False)
    head: str = "int8"  # "int8_group": the output matrix is Q8_0 and loads as shipped
    name: str = "gguf"

    def linear_method(self, prefix: str) -> LinearMethod | None:
        kind = self.kept.get(prefix)
        if kind is None:
            return None
        if kind == "Q8_0":
            from fleetlm.quantization.int8_group import Int8GroupLinearMethod

            return Int8GroupLinearMethod(BLOCK)
        from fleetlm.quantization.int4 import Int4LinearMethod

        return Int4LinearMethod(BLOCK, prequantized=True)

    def lm_head(self) -> str:
        return self.head

    def describe(self) -> str:
        kinds = sorted(set(self.kept.values()))
        return f"gguf ({', '.join(kinds)} kept quantized in {len(self.kept)} layers)"


def plan_kept(tensors: list) -> GGUFQuantConfig | None:
    """Decide, from the file's tensor table, which linear layers stay quantized (None: none do,
    and the model loads unquantized as before)."""
    parts: dict[str, set[str]] = defaultdict(set)
    for t in tensors:
        bits = t.name.split(".")
        if len(bits) == 4 and bits[0] == "blk" and bits[3] == "weight" and bits[2] in (*_MERGED, *_OURS):
            parts[f"{bits[1]}.{_MERGED.get(bits[2], bits[2])}"].add(t.tensor_type.name)
    kept = {}
    for key, types in parts.items():
        layer, kind = key.split(".")
        if len(types) == 1 and (t := next(iter(types))) in KEPT_TYPES:
            kept[f"model.layers.{layer}.{_OURS[kind]}"] = t
    notices = sorted({t.tensor_type.name for t in tensors} - set(KEPT_TYPES) - {"F32"})
    if notices:
        logger.info("GGUF: %s tensors are dequantized at load (kept quantized: %s)", ", ".join(notices),
                    ", ".join(KEPT_TYPES))
    names = {t.name: t.tensor_type.name for t in tensors}
    head = names.get("output.weight", names.get("token_embd.weight"))
    if not kept and head != "Q8_0":
        return None
    return GGUFQuantConfig(kept, "int8_group" if head == "Q8_0" else "int8")


def is_kept(cfg: GGUFQuantConfig, hf_name: str) -> bool:
    """Whether checkpoint tensor ``hf_name`` (``...q_proj.weight``) belongs to a kept layer."""
    for hf, ours in ((".q_proj.", ".qkv_proj."), (".k_proj.", ".qkv_proj."), (".v_proj.", ".qkv_proj."),
                     (".gate_proj.", ".gate_up_proj."), (".up_proj.", ".gate_up_proj.")):
        hf_name = hf_name.replace(hf, ours)
    return hf_name.endswith(".weight") and hf_name[: -len(".weight")] in cfg.kept


def decode_blocks(raw: np.ndarray, kind: str, rows: int, cols: int) -> dict[str, np.ndarray]:
    """Raw block bytes [rows, cols / 32 * block bytes] -> ``qweight`` [rows, cols] and per-block
    ``scales`` (and ``zeros`` for the 4-bit types) [rows, cols / 32], in our conventions."""
    nb = cols // BLOCK
    if kind == "Q8_0":
        b = raw.reshape(rows, nb, 34)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = b[..., 2:].copy().view(np.int8).reshape(rows, cols)
        return {"qweight": q, "scales": d}
    size = 18 if kind == "Q4_0" else 20
    b = raw.reshape(rows, nb, size)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    nib = b[..., size - 16 :]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).reshape(rows, cols)
    if kind == "Q4_0":
        zero = np.zeros_like(d)
    else:
        zero = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8.0 * d
    return {"qweight": q, "scales": d, "zeros": zero}


def head_tensors(t) -> list[tuple[str, torch.Tensor]]:
    """A Q8_0 output matrix (or tied embedding) as the LM head's codes and block scales."""
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
