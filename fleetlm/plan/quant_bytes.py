"""Weight bytes of fleetlm's own quantized layouts (fleetlm/quantization), exactly: what the
engine holds in its linear layers, embedding and LM head for a quantization format.

The per-format figures in ``formats.py`` are the usual approximations for any engine (scales
left out); these follow fleetlm's tensors, so a test can compare them with the bytes allocated:

- unquantized: ``N K`` x the model dtype for every matrix; embedding (and an untied head) too;
- ``int8`` / ``w8a8``: ``N K`` int8 + ``N`` scales in the model dtype per matrix (``w8a8`` also
  keeps a transposed copy of the codes for ``torch._int_mm``: ``2 N K``); the LM head an int8
  copy with per-row scales (tied: beside the embedding, which stays in the model dtype);
- ``int4`` (group ``g``): ``N' K / 2`` bytes of nibbles + ``K / g x N' x 2`` scale/zero pairs in
  the model dtype, ``N' = ceil(N / 16) 16`` (rows padded as torch's CPU packing needs); for decode
  either ``N' K / 2`` more for torch's packed kernel, or, on a machine with AVX512-VNNI and ``K`` a
  multiple of 64, ``2 x N' x K / g`` fp16 scales and minimums for the int4 x int8 kernel
  (``int4_q8=True``); LM head as ``int8``;
- GGUF kept ``Q4_0``/``Q4_1``/``Q4_K``: as ``int4`` with ``g = 32``; ``Q8_0``: ``N K`` int8 +
  ``N K / 32`` fp32 scales; ``Q6_K``: ``N K`` int8 + ``N K / 16`` fp32 scales; a Q8_0 or Q6_K LM
  head likewise (``int8_group`` / ``int8_group16``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool


def matrices(d: Dims) -> list[tuple[int, int]]:
    """(N, K) of every linear layer of one rank at TP 1 (qkv, o, gate_up, down per layer)."""
    per_layer = [((d.heads + 2 * d.kv_heads) * d.head_dim, d.hidden), (d.hidden, d.heads * d.head_dim),
                 (2 * d.intermediate, d.hidden), (d.hidden, d.intermediate)]
    return per_layer * d.layers


def matrix_bytes(fmt: str, n: int, k: int, act_bytes: int, int4_q8: bool = False) -> int:
    if fmt in ("none", "dequantize"):
        return n * k * act_bytes
    if fmt == "int8":
        return n * k + n * act_bytes
    if fmt == "w8a8":
        return 2 * n * k + n * act_bytes + n * 4
    if fmt in ("Q8_0", "int8_group"):
        return n * k + n * k // 32 * 4
    if fmt in ("Q6_K", "int8_group16"):
        return n * k + n * k // 16 * 4
    group = 32 if fmt in ("Q4_0", "Q4_1", "Q4_K") else int(fmt.split("_g")[1])
    n_pad = math.ceil(n / 16) * 16
    nibbles_and_pairs = n_pad * k // 2 + k // group * n_pad * 2 * act_bytes
    if int4_q8 and k % 64 == 0:
        return nibbles_and_pairs + 2 * n_pad * (k // group) * 2  # the int4 x int8 kernel's fp16 scales, minimums
    return nibbles_and_pairs + n_pad * k // 2  # torch's packed copy


def engine_weight_bytes(d: Dims, fmt: str, act_bytes: int = 2, head: str | None = None,
                        int4_q8: bool = False) -> int:
    """Linear layers + embedding + LM head. ``fmt``: ``none`` | ``int8`` | ``w8a8`` |
    ``int4_g{32,64,128}`` | a GGUF type kept for every layer (``Q4_0``/``Q4_1``/``Q4_K``/``Q8_0``/
    ``Q6_K``); ``head``: ``int8`` | ``int8_group`` | ``int8_group16`` | None (unquantized head; the default for ``none``); ``int4_q8``: int4 layers
    decode with the int4 x int8 kernel (``fleetlm.quantization.base.int8_activation_kernels()`` is not
    None on this machine)."""
    total = sum(matrix_bytes(fmt, n, k, act_bytes, int4_q8) for n, k in matrices(d))
    embed = d.vocab * d.hidden * act_bytes
    if head is None and fmt not in ("none", "dequantize"):
        head = "int8"
    if head is None:
        return total + embed * (1 if d.tied else 2)
    return total + embed + matrix_bytes(head, d.vocab, d.hidden, act_bytes)
