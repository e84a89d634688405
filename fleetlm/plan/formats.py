"""Bytes per parameter of every weight format the planner knows, and KV-cache dtypes.

A weight format says how many bytes each parameter costs in three groups:

* ``matrix``: the linear layers inside the transformer blocks (attention, MLP, experts);
* ``embed``: the token embedding and the LM head;
* ``other``: norms, biases and MoE routers (always small).

Quantized checkpoints quantize only some groups, so one number per model would be wrong.
Sources of the sizes:

* int4 (GPTQ / AWQ, W4A16): 4-bit weights plus, per group of ``g`` input weights, one fp16
  scale and one packed 4-bit zero point: ``4 + 16/g + 4/g`` bits (4.156 bits at g=128);
  embeddings, LM head and norms stay fp16.
* int8 / fp8 (W8A16, W8A8-FP8): 1 byte per weight; the per-output-channel fp16 scale adds
  2/in_features bytes (< 0.1% for in_features >= 2048) and is left out; embeddings stay 16-bit.
* GGUF block formats (ggml ``block_q4_0`` etc. in ``ggml-common.h``): Q4_0 = 18 bytes per 32
  weights (fp16 scale + 16 bytes of nibbles), Q4_1 = 20 B / 32 (fp16 scale and min), Q8_0 =
  34 B / 32, Q4_K = 144 B / 256, Q6_K = 210 B / 256. llama.cpp quantizes the embedding too and
  keeps norms in F32. For a GGUF file, ``native`` takes the exact bytes from the file's tensor
  table instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm.plan.errors import choices_error


@dataclass(frozen=True)
class WeightFormat:
    """Bytes per parameter for each parameter group, and the precision the math runs in."""

    name: str
    matrix: float
    embed: float
    other: float
    compute: str  # key into HardwareSpec.peak_flops: "fp32", "bf16" or "fp8"
    note: str = ""

    def bytes_for(self, matrix: int, embed: int, other: int) -> int:
        return round(matrix * self.matrix + embed * self.embed + other * self.other)


def int4_format(group_size: int = 128) -> WeightFormat:
    """GPTQ/AWQ-style int4 with one fp16 scale and one 4-bit zero per ``group_size`` weights."""
    bits = 4 + 16 / group_size + 4 / group_size
    return WeightFormat("int4", bits / 8, 2, 2, "bf16", f"g={group_size}: {bits:.3f} bits/weight")


def _gguf(name: str, block_bytes: int, block_weights: int) -> WeightFormat:
    b = block_bytes / block_weights
    return WeightFormat(name, b, b, 4, "bf16", f"{block_bytes} B per {block_weights} weights")


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat("fp32", 4, 4, 4, "fp32"),
        WeightFormat("fp16", 2, 2, 2, "bf16"),
        WeightFormat("bf16", 2, 2, 2, "bf16"),
        WeightFormat("fp8", 1, 2, 2, "fp8", "W8A8 FP8; embeddings and LM head bf16"),
        WeightFormat("int8", 1, 2, 2, "bf16", "W8A16 per-channel; embeddings and LM head bf16"),
        int4_format(128),
        _gguf("q4_0", 18, 32),
        _gguf("q4_1", 20, 32),
        _gguf("q8_0", 34, 32),
        _gguf("q4_k", 144, 256),
        _gguf("q6_k", 210, 256),
    )
}
NATIVE = "native"  # GGUF only: the file's own tensor bytes

# Aliases accepted on the command line.
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
                  "float8": "fp8", "fp8_e4m3": "fp8", "awq": "int4", "gptq": "int4"}

KV_DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}


def weight_dtypes() -> list[str]:
    return [*WEIGHT_FORMATS, NATIVE]


def canonical_dtype(name: str) -> str:
    key = name.lower()
    return _DTYPE_ALIASES.get(key, key)


def weight_format(name: str, int4_group_size: int = 128) -> WeightFormat:
    """Look up a weight format by name (``native`` is resolved by the caller)."""
    key = canonical_dtype(name)
    if key == "int4":
        return int4_format(int4_group_size)
    if key not in WEIGHT_FORMATS:
        raise choices_error("weight dtype", name, weight_dtypes())
    return WEIGHT_FORMATS[key]


def kv_dtype_bytes(name: str) -> int:
    key = canonical_dtype(name)
    if key not in KV_DTYPE_BYTES:
        raise choices_error("KV-cache dtype", name, list(KV_DTYPE_BYTES))
    return KV_DTYPE_BYTES[key]
