"""MXFP4 weights (OCP microscaling FP4), as GGUF ``MXFP4`` ships them, kept quantized and
dequantized inside the kernel.

Format (ggml ``block_mxfp4``, 17 bytes per 32 weights along the input dimension): one E8M0
exponent byte ``e``, then 16 bytes of E2M1 codes; weight ``j`` of the block is the low nibble of
byte ``j`` and weight ``j + 16`` its high nibble. The value is ``kvalue[code] * 2^(e - 128)``
with ggml's doubled E2M1 values ``{0, 1, 2, 3, 4, 6, 8, 12}`` (code 8-15: the negatives) and its
half scale (``ggml_e8m0_to_fp32_half``: a denormal below ``e = 2``) - the OCP value
``e2m1 * 2^(e - 127)`` computed so that no scale overflows float32. Every weight is exact in
float32 and bf16.

Our layout: ``codes`` [rows, K/2] uint8, the blocks' 16 bytes as shipped (so a slice of whole
blocks along K is a slice of columns), ``scales`` [rows, K/32] uint8 (the exponents). The
routed experts keep both in one uint8 parameter per projection, codes then exponents on each
row (``w13_weight`` [E, 2 I, H/2 + H/32], ``w2_weight`` [E, H, I/2 + I/32]), so the MoE layer's
loading, expert parallelism and replica copies see one tensor per projection as before.

Compute (``csrc/cpu_ops.cpp``): up to ``KERNEL_ROWS`` rows (8 in bf16, 24 in fp32),
``mxfp4_linear`` (a GEMV that decodes each block in registers with a 16-entry LUT and applies it
to up to 8 input rows at a time; parallel over output rows); from there ``mxfp4_dequant`` writes
the dense weight in the activation dtype and the dtype's GEMM runs. Without the compiled ops (or off the CPU, or when
the input's gradient is wanted) the weight is dequantized with torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.layers.linear import LinearMethod
from fleetlm.layers.moe import FusedMoE, MoEMethod
from fleetlm.quantization.base import QuantConfig, as_2d
from fleetlm.quantization.int8 import needs_grad

logger = logging.getLogger("fleetlm")
BLOCK = 32
BLOCK_BYTES = 17  # 1 exponent byte + 16 bytes of nibbles
# ggml's kvalues: E2M1 doubled, paired with the half scale 2^(e - 128)
KVALUES = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 0.0, -1.0, -2.0, -3.0, -4.0, -6.0, -8.0, -12.0)
# Up to this many rows the LUT GEMV beats dequantize + GEMM (one thread, [1536, 2048]: 0.22 ms at
# 1 row, +0.1 ms a row from 4; dequantize + GEMM ~0.85 ms in bf16 (AMX), 1-2.8 ms in fp32)
KERNEL_ROWS = {torch.float32: 24}
KERNEL_ROWS_DEFAULT = 8  # bf16 / fp16
_EXPERT_KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def row_bytes(k: int) -> int:
    """Bytes of one row of K weights in our layout (codes, then exponents)."""
    return k // 2 + k // BLOCK


def check_block_multiple(k: int, what: str) -> None:
    if k % BLOCK:
        raise ValueError(f"MXFP4 needs {what} to be a multiple of its {BLOCK}-weight block, got {k}")


def decode_blocks(raw, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF MXFP4 bytes [rows, cols/32 * 17] (numpy or torch uint8) -> (codes uint8 [rows, cols/2]
    in ggml's block order, scale exponents uint8 [rows, cols/32])."""
    check_block_multiple(cols, "the row length")
    nb = cols // BLOCK
    is_np = isinstance(raw, np.ndarray)
    uint8, size = (raw.dtype == np.uint8, raw.size) if is_np else (raw.dtype == torch.uint8, raw.numel())
    if not uint8 or size != rows * nb * BLOCK_BYTES:
        raise ValueError(f"MXFP4 blocks for [{rows}, {cols}] are {rows * nb * BLOCK_BYTES} uint8 bytes; got "
                         f"{raw.dtype} {list(raw.shape)}")
    b = raw.reshape(rows, nb, BLOCK_BYTES)
    codes, scales = b[..., 1:].reshape(rows, nb * 16), b[..., 0]
    if is_np:  # copies (a GGUF's blocks are mapped read-only)
        return torch.from_numpy(np.array(codes)), torch.from_numpy(np.array(scales))
    return codes.contiguous(), scales.contiguous()


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Packed nibbles [rows, K/2] -> one 4-bit code per weight, uint8 [rows, K] in 0..15."""
    rows = codes.shape[0]
    b = codes.reshape(rows, -1, 16)
    return torch.cat([b & 0x0F, b >> 4], dim=-1).reshape(rows, -1)


def half_scales(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 exponents -> ggml's half scale ``2^(e - 128)`` in float32, bit-exact."""
    e = scales.to(torch.int32)
    bits = torch.where(e < 2, torch.bitwise_left_shift(torch.full_like(e, 0x00200000), e), (e - 1) << 23)
    return bits.view(torch.float32)


def dequantize_mxfp4(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights [rows, K] (computed in float32, where they are exact; then ``dtype``)."""
    rows, nb = scales.shape
    if codes.shape != (rows, nb * 16):
        raise ValueError(f"MXFP4 codes {list(codes.shape)} and scales {list(scales.shape)} disagree")
    lut = torch.tensor(KVALUES, dtype=torch.float32, device=codes.device)
    q = unpack_codes(codes).reshape(rows, nb, BLOCK).long()
    w = lut[q] * half_scales(scales)[..., None]
    return w.reshape(rows, nb * BLOCK).to(dtype)


def _kernel(codes: torch.Tensor):
    if codes.device.type != "cpu":
        return None
    from fleetlm.ops import cpu_ops

    ops = cpu_ops()
    return ops if ops is not None and hasattr(ops, "mxfp4_linear") else None


def mxfp4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, kernel=None) -> torch.Tensor:
    """``x @ w.T`` in ``x``'s dtype for x [..., K] and the MXFP4 weight [N, K]. ``kernel``: the
    compiled ops (None: torch's dequantize, then the dtype's matmul)."""
    x2, lead = as_2d(x)
    k = scales.shape[1] * BLOCK
    if x2.shape[1] != k:
        raise ValueError(f"MXFP4 matmul: the input has {x2.shape[1]} features, the weight {k}")
    if kernel is not None and not needs_grad(x2):
        if x2.shape[0] <= KERNEL_ROWS.get(x2.dtype, KERNEL_ROWS_DEFAULT):
            y = kernel.mxfp4_linear(x2.float(), codes, scales).to(x2.dtype)
        else:
            y = F.linear(x2, kernel.mxfp4_dequant(codes, scales, x2.dtype))
    else:
        y = F.linear(x2, dequantize_mxfp4(codes, scales, x2.dtype))
    return y.reshape(*lead, y.shape[-1])


def _split(packed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) views of rows that hold codes then exponents."""
    return packed[..., : k // 2], packed[..., k // 2 :]


class MXFP4MoEMethod(MoEMethod):
    """Routed experts kept in MXFP4 (module docstring). ``load`` takes a GGUF expert slice as its
    raw blocks (uint8 [rows, cols/32 * 17]): gate/up keep this rank's rows, down this rank's
    input columns in whole blocks, so ``intermediate / tp`` must be a multiple of 32."""

    def create_weights(self, layer: FusedMoE, num_experts: int, hidden: int, intermediate: int,
                       dtype: torch.dtype) -> None:
        check_block_multiple(hidden, "the hidden size (the experts' gate/up input)")
        if intermediate % BLOCK:
            tp = 1 if layer.expert_parallel else layer.group_size
            raise ValueError(f"MXFP4 experts: the expert width per rank ({layer.intermediate_size} / tensor parallel "
                             f"{tp} = {intermediate}) is not a multiple of the {BLOCK}-weight block; use another "
                             "tensor_parallel_size, expert parallelism, or quantization='dequantize'")
        layer.act_dtype = dtype
        layer.w13_weight = nn.Parameter(torch.zeros(num_experts, 2 * intermediate, row_bytes(hidden), dtype=torch.uint8),
                                        requires_grad=False)
        layer.w2_weight = nn.Parameter(torch.zeros(num_experts, hidden, row_bytes(intermediate), dtype=torch.uint8),
                                       requires_grad=False)

    def load(self, layer: FusedMoE, expert: int, kind: str, loaded: torch.Tensor) -> None:
        i, h, full = layer.intermediate_per_rank, layer.hidden_size, layer.intermediate_size
        start = layer.shard_rank * i
        if kind in ("gate", "up"):
            codes, scales = _blocks(loaded, full, h, kind)
            dst = layer.w13_weight.data[expert].narrow(0, 0 if kind == "gate" else i, i)
            src = (codes.narrow(0, start, i), scales.narrow(0, start, i))
            k = h
        elif kind == "down":
            codes, scales = _blocks(loaded, h, full, kind)
            dst = layer.w2_weight.data[expert]
            src = (codes.narrow(1, start // 2, i // 2), scales.narrow(1, start // BLOCK, i // BLOCK))
            k = i
        else:
            raise ValueError(f"expert weight kind must be gate, up or down, got {kind!r}")
        dc, ds = _split(dst, k)
        dc.copy_(src[0])
        ds.copy_(src[1])

    def apply(self, layer: FusedMoE, expert: int, x: torch.Tensor) -> torch.Tensor:
        w13, w2 = layer.w13_weight[expert], layer.w2_weight[expert]
        kernel = _kernel(w13)
        gate_up = mxfp4_linear(x, *_split(w13, layer.hidden_size), kernel)
        n = gate_up.shape[-1] // 2
        return mxfp4_linear(F.silu(gate_up[..., :n]) * gate_up[..., n:], *_split(w2, layer.intermediate_per_rank),
                            kernel)

    def dequantized(self, layer: FusedMoE, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2 I, H], w2 [H, I]) of one local expert slot in float32 (tests compare with it)."""
        return (dequantize_mxfp4(*_split(layer.w13_weight.data[expert], layer.hidden_size)),
                dequantize_mxfp4(*_split(layer.w2_weight.data[expert], layer.intermediate_per_rank)))


def _blocks(loaded: torch.Tensor, rows: int, cols: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    want = (rows, cols // BLOCK * BLOCK_BYTES)
    if loaded.dtype != torch.uint8 or tuple(loaded.shape) != want:
        raise ValueError(f"MXFP4 expert {kind} weight: expected the GGUF blocks of a [{rows}, {cols}] matrix "
                         f"(uint8 {list(want)}), got {loaded.dtype} {list(loaded.shape)}")
    return decode_blocks(loaded, rows, cols)


class MXFP4LinearMethod(LinearMethod):
    """A dense linear layer kept in MXFP4: ``qweight`` (codes, uint8 [out, in/2]) and ``scales``
    (exponents, uint8 [out, in/32]) as ``decode_blocks`` returns them. The layers'
    ``weight_loader`` slices both (row-parallel layers by columns: whole blocks when this rank's
    input is a multiple of 32)."""

    def create_weights(self, layer, in_per_rank: int, out_per_rank: int, dtype: torch.dtype) -> None:
        check_block_multiple(in_per_rank, f"this rank's input size of {type(layer).__name__}")
        layer.act_dtype = dtype
        layer.qweight = nn.Parameter(torch.zeros(out_per_rank, in_per_rank // 2, dtype=torch.uint8),
                                     requires_grad=False)
        layer.scales = nn.Parameter(torch.zeros(out_per_rank, in_per_rank // BLOCK, dtype=torch.uint8),
                                    requires_grad=False)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.kernel = _kernel(layer.qweight)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = mxfp4_linear(x, layer.qweight, layer.scales, getattr(layer, "kernel", None))
        return y if bias is None else y + bias

    def dequantized(self, layer) -> torch.Tensor:
        return dequantize_mxfp4(layer.qweight, layer.scales)


# -- GGUF: which routed experts stay MXFP4 -----------------------------------------------------
def plan_experts(tensors, architecture: str) -> tuple[frozenset[str], frozenset[str]]:
    """From a GGUF tensor table: (the FusedMoE prefixes whose experts stay MXFP4, the GGUF names
    of their ``ffn_{gate,up,down}_exps`` tensors). A layer stays MXFP4 only when all three are."""
    from fleetlm.models.gguf_moe import family_prefix

    types: dict[str, dict[str, str]] = {}
    for t in tensors:
        bits = t.name.split(".")
        if len(bits) == 4 and bits[0] == "blk" and bits[2] in _EXPERT_KINDS and bits[3] == "weight":
            types.setdefault(bits[1], {})[t.name] = t.tensor_type.name
    layers, names, mixed = set(), set(), []
    for layer, kinds in types.items():
        if len(kinds) == 3 and set(kinds.values()) == {"MXFP4"}:
            layers.add(f"model.layers.{layer}.{family_prefix(architecture)}.experts")
            names |= set(kinds)
        elif "MXFP4" in kinds.values():
            mixed.append(layer)
    if mixed:
        logger.info("GGUF: the experts of layer(s) %s mix MXFP4 with other types and are dequantized at load",
                    ", ".join(sorted(mixed, key=int)))
    if layers:
        logger.info("GGUF: MXFP4 experts kept quantized in %d layers", len(layers))
    return frozenset(layers), frozenset(names)


@dataclass(frozen=True)
class MXFP4ExpertsConfig(QuantConfig):
    """A GGUF's quantization with its MXFP4 routed experts kept: the named FusedMoE layers get
    ``MXFP4MoEMethod``; dense layers and the LM head are decided by ``inner`` (the GGUF's
    ``GGUFQuantConfig``, or None: unquantized)."""

    experts: frozenset[str] = field(default_factory=frozenset)
    inner: QuantConfig | None = field(default=None, hash=False)
    name: str = "gguf"

    def linear_method(self, prefix: str) -> LinearMethod | None:
        return None if self.inner is None else self.inner.linear_method(prefix)

    def moe_method(self, prefix: str) -> MoEMethod | None:
        if prefix in self.experts:
            return MXFP4MoEMethod()
        return None if self.inner is None else self.inner.moe_method(prefix)

    def lm_head(self) -> str | None:
        return None if self.inner is None else self.inner.lm_head()

    def describe(self) -> str:
        experts = f"MXFP4 experts kept quantized in {len(self.experts)} layers"
        return experts if self.inner is None else f"{self.inner.describe()}; {experts}"


def with_experts(inner: QuantConfig | None, experts: frozenset[str]) -> QuantConfig | None:
    """``inner``, plus MXFP4 experts when there are any."""
    return MXFP4ExpertsConfig(experts, inner) if experts else inner


def expert_blocks(t, layer: str, kind: str, architecture: str):
    """``(hf_name, raw MXFP4 blocks uint8 [rows, cols/32 * 17])`` per expert of a stacked GGUF
    ``ffn_*_exps`` tensor kept quantized (``MXFP4MoEMethod.load`` decodes them)."""
    from fleetlm.models.gguf_moe import expert_slices

    raw = np.asarray(t.data)
    e, rows, cols = (int(x) for x in reversed(t.shape.tolist()))
    raw = raw.reshape(e, rows, cols // BLOCK * BLOCK_BYTES)
    for hf, a in expert_slices(layer, kind, raw, architecture):
        yield hf, torch.from_numpy(np.array(a))  # a copy: the file is mapped read-only
