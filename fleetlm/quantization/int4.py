"""Weight-only int4, group-wise and asymmetric (W4A16).

Per group of ``g`` consecutive input weights of one output row: ``w ≈ (q - 8) * scale + zero``
with ``q`` in [0, 15] (the convention of torch's int4 kernels, where ``zero`` is a float offset).
Quantized at load: ``scale = (max - min) / 15``, ``q = round((w - min) / scale)``, ``zero = min +
8 * scale``. Pre-quantized checkpoints (GGUF Q4_0 / Q4_1, GPTQ / AWQ) arrive as codes, scales and
zeros in the same convention (``Int4LinearMethod(prequantized=True)``).

On the CPU the codes are repacked for ``torch._weight_int4pack_mm_for_cpu`` (scales and zeros in
the activation dtype; output rows padded to a multiple of 16, which its packing needs), used below
``INT4_GEMM_ROWS`` rows in bf16. That kernel is a GEMV: at 2048 rows it took 212 ms where bf16's GEMM
took 28, so longer inputs (and fp32 inputs, where the kernel is a scalar loop) dequantize a second
copy of the codes (two per byte, our own layout) in fp32, round once to the activation dtype and
use the dtype's GEMM. The copy doubles the int4 weight bytes (still a quarter of bf16). Elsewhere
the weight is dequantized per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.layers.linear import LinearMethod
from fleetlm.quantization.base import as_2d, drop_param, staging_weight
from fleetlm.quantization.int8 import needs_grad

INT4_GROUP_SIZES = (32, 64, 128)
_PACK_ROWS = 16  # the CPU packing needs N % 16 == 0
_INNER_K_TILES = 2
# From this many rows dequantize + GEMM wins: the packed kernel's time grows with the rows (~22 us a
# row for [3072, 576]); the compiled dequantization of that matrix and a bf16 GEMM take 0.27 ms at
# 8-16 rows (`python benchmarks/quant_rows.py`; benchmarks/RESULTS.md, issue 17, second pass).
INT4_GEMM_ROWS = 16


def check_group_size(group_size: int, in_features: int, what: str = "the layer") -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported; accepted: "
                         f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    if in_features % group_size:
        ok = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        raise ValueError(f"int4 group size {group_size} does not divide the input size of {what} "
                         f"({in_features} per rank); accepted here: {', '.join(map(str, ok)) or 'none'}")


def quantize_int4_groups(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [N, K] in 0..15, scale fp32 [N, K/g], zero fp32 [N, K/g])."""
    n, k = w.shape
    wg = w.float().reshape(n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15.0).clamp_(min=1e-10)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, lo + 8.0 * scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    g = k // scale.shape[1]
    w = (q.float().reshape(n, k // g, g) - 8.0) * scale[..., None].float() + zero[..., None].float()
    return w.reshape(n, k)


class Int4LinearMethod(LinearMethod):
    def __init__(self, group_size: int, prequantized: bool = False) -> None:
        self.group_size = group_size
        self.prequantized = prequantized

    def create_weights(self, layer, in_per_rank: int, out_per_rank: int, dtype: torch.dtype) -> None:
        check_group_size(self.group_size, in_per_rank, type(layer).__name__)
        layer.act_dtype = dtype
        if not self.prequantized:
            return staging_weight(layer, in_per_rank, out_per_rank, dtype)
        groups = in_per_rank // self.group_size
        layer.qweight = nn.Parameter(torch.empty(out_per_rank, in_per_rank, dtype=torch.uint8), requires_grad=False)
        layer.scales = nn.Parameter(torch.empty(out_per_rank, groups), requires_grad=False)
        layer.zeros = nn.Parameter(torch.empty(out_per_rank, groups), requires_grad=False)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.prequantized:
            q, s, z = (drop_param(layer, n) for n in ("qweight", "scales", "zeros"))
        else:
            q, s, z = quantize_int4_groups(drop_param(layer, "weight"), self.group_size)
        layer.out_features = q.shape[0]
        if q.device.type != "cpu":
            for name, t in (("qweight", q), ("scales", s), ("zeros", z)):
                layer.register_buffer(name, t, persistent=False)
            return
        pad = -q.shape[0] % _PACK_ROWS
        if pad:
            q = F.pad(q, (0, 0, 0, pad), value=8)
            s, z = F.pad(s, (0, 0, 0, pad), value=1.0), F.pad(z, (0, 0, 0, pad))
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), _INNER_K_TILES)
        sz = torch.stack([s.t(), z.t()], dim=-1).to(layer.act_dtype).contiguous()  # [K/g, N, 2]
        layer.register_buffer("packed", packed, persistent=False)
        layer.register_buffer("scales_zeros", sz, persistent=False)
        # the kernel's packing is opaque; two codes per byte of our own for the GEMM path
        layer.register_buffer("nibbles", (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), persistent=False)
        from fleetlm.ops import cpu_ops

        ops = cpu_ops()
        layer.dequant_kernel = ops if ops is not None and hasattr(ops, "int4_dequant") else None

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2, lead = as_2d(x)
        n = layer.out_features
        # the packed kernel is a GEMV, and in fp32 a scalar loop (45x slower than in bf16)
        if hasattr(layer, "packed") and x2.shape[0] < INT4_GEMM_ROWS and x2.dtype != torch.float32 \
                and not needs_grad(x2):  # QLoRA: the GEMM path carries the input's gradient
            y = torch._weight_int4pack_mm_for_cpu(x2, layer.packed, self.group_size, layer.scales_zeros)
            y = y[:, :n] if y.shape[1] != n else y
        elif hasattr(layer, "packed"):  # prefill / large batch: dequantize, then the dtype's GEMM
            y = F.linear(x2, self._from_nibbles(layer, x2.dtype))[:, :n]
        else:
            y = F.linear(x2, dequantize_int4(layer.qweight, layer.scales, layer.zeros).to(x2.dtype))
        y = y.reshape(*lead, n)
        return y if bias is None else y + bias

    def _from_nibbles(self, layer, dtype: torch.dtype) -> torch.Tensor:
        if layer.dequant_kernel is not None:  # one compiled pass (csrc/cpu_ops.cpp)
            return layer.dequant_kernel.int4_dequant(layer.nibbles, layer.scales_zeros, self.group_size, dtype)
        b = layer.nibbles
        q = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(b.shape[0], -1)  # [N', K]
        sz = layer.scales_zeros  # [K/g, N', 2]
        return dequantize_int4(q, sz[..., 0].t(), sz[..., 1].t()).to(dtype)

    def dequantized(self, layer) -> torch.Tensor:
        """The weight this layer computes with, [N, K] fp32 (tests compare against it)."""
        if not hasattr(layer, "packed"):
            return dequantize_int4(layer.qweight, layer.scales, layer.zeros)
        k = layer.scales_zeros.shape[0] * self.group_size
        eye = torch.eye(k, dtype=layer.act_dtype)
        w = torch._weight_int4pack_mm_for_cpu(eye, layer.packed, self.group_size, layer.scales_zeros)
        return w[:, : layer.out_features].t().float()
