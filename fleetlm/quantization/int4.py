"""Weight-only int4, group-wise and asymmetric (W4A16; decode rows W4A8 on machines with VNNI).

Per group of ``g`` consecutive input weights of one output row: ``w ≈ (q - 8) * scale + zero``
with ``q`` in [0, 15] (the convention of torch's int4 kernels, where ``zero`` is a float offset).
Quantized at load: ``scale = (max - min) / 15``, ``q = round((w - min) / scale)``, ``zero = min +
8 * scale``. Pre-quantized checkpoints (GGUF Q4_0 / Q4_1, GPTQ / AWQ) arrive as codes, scales and
zeros in the same convention (``Int4LinearMethod(prequantized=True)``).

On the CPU every layer keeps the codes two per byte (``nibbles``, our own layout), and how it
multiplies depends on the rows and the machine:

- Below ``INT4_Q8_ROWS`` bf16 rows (decode), with AVX512-VNNI: the activations are rounded to
  int8 per 32 values (scale ``amax / 127``, as llama.cpp's Q8 activations) and multiplied with the
  codes as integers (``csrc/int4_q8.cpp``; scale and ``zero - 8 * scale`` in fp16 per group). This
  is W4A8 for those rows: the one rounding it adds is the activations' (relative error ~0.4% of a
  block's largest value per element; on SmolLM2 Q4_1 perplexity +0.8%, benchmarks/RESULTS.md,
  issue 17 third pass). ``FLEETLM_INT8_ACTIVATIONS=0`` turns it off.
- Below ``INT4_GEMM_ROWS`` bf16 rows without VNNI: ``torch._weight_int4pack_mm_for_cpu`` on a
  second, repacked copy (scales and zeros in the activation dtype; output rows padded to a
  multiple of 16, which its packing needs).
- Longer inputs (prefill, large batches) and fp32 / fp16 inputs dequantize the nibbles in fp32,
  round once to the activation dtype and use the dtype's GEMM (the GEMV kernels lose to it there:
  torch's took 212 ms at 2048 rows where bf16's GEMM took 28).

Elsewhere (no compiled ops, other devices) the weight is dequantized per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.layers.linear import LinearMethod
from fleetlm.quantization.base import as_2d, drop_param, int8_activation_kernels, staging_weight
from fleetlm.quantization.int8 import needs_grad

INT4_GROUP_SIZES = (32, 64, 128)
_PACK_ROWS = 16  # the CPU packing needs N % 16 == 0
_INNER_K_TILES = 2
# From this many rows dequantize + GEMM wins: the packed kernel's time grows with the rows (~22 us a
# row for [3072, 576]); the compiled dequantization of that matrix and a bf16 GEMM take 0.27 ms at
# 8-16 rows (`python benchmarks/quant_rows.py`; benchmarks/RESULTS.md, issue 17, second pass).
INT4_GEMM_ROWS = 16
# The int4 x int8 kernel (AVX512-VNNI) below this many rows: in the engine, where the weights come
# from beyond the caches, 16 decode rows ran 30% faster with it than dequantize + GEMM, 24 rows 7%,
# 32 rows the same, 64 rows 22% slower (16-64 prompts x 192 greedy tokens, shipped GGUF).
INT4_Q8_ROWS = 24


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
        layer.register_buffer("nibbles", (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), persistent=False)
        sz = torch.stack([s.t(), z.t()], dim=-1).to(layer.act_dtype).contiguous()  # [K/g, N, 2]
        layer.register_buffer("scales_zeros", sz, persistent=False)
        from fleetlm.ops import cpu_ops

        ops = cpu_ops()
        layer.dequant_kernel = ops if ops is not None and hasattr(ops, "int4_dequant") else None
        if int8_activation_kernels() is not None and q.shape[1] % 64 == 0:
            layer.q8_kernel = ops
            layer.register_buffer("q8_scales", s.to(torch.float16).contiguous(), persistent=False)
            layer.register_buffer("q8_mins", (z - 8.0 * s).to(torch.float16).contiguous(), persistent=False)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), _INNER_K_TILES)
            layer.register_buffer("packed", packed, persistent=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2, lead = as_2d(x)
        n = layer.out_features
        # QLoRA: an input whose gradient is wanted takes the GEMM path, which carries it
        rows, grad = x2.shape[0], needs_grad(x2)
        gemv = rows < INT4_GEMM_ROWS and not grad
        if rows < INT4_Q8_ROWS and not grad and hasattr(layer, "q8_kernel") and x2.dtype == torch.bfloat16:
            y = layer.q8_kernel.int4_q8_linear(x2, layer.nibbles, layer.q8_scales, layer.q8_mins, self.group_size)
        elif gemv and hasattr(layer, "packed") and x2.dtype != torch.float32:  # fp32: a scalar loop there
            y = torch._weight_int4pack_mm_for_cpu(x2, layer.packed, self.group_size, layer.scales_zeros)
        elif hasattr(layer, "nibbles"):  # prefill / large batch: dequantize, then the dtype's GEMM
            y = F.linear(x2, self._from_nibbles(layer, x2.dtype))
        else:
            y = F.linear(x2, dequantize_int4(layer.qweight, layer.scales, layer.zeros).to(x2.dtype))
        y = (y[:, :n] if y.shape[1] != n else y).reshape(*lead, n)
        return y if bias is None else y + bias

    def _from_nibbles(self, layer, dtype: torch.dtype) -> torch.Tensor:
        if layer.dequant_kernel is not None:  # one compiled pass (csrc/cpu_ops.cpp)
            return layer.dequant_kernel.int4_dequant(layer.nibbles, layer.scales_zeros, self.group_size, dtype)
        b = layer.nibbles
        q = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(b.shape[0], -1)  # [N', K]
        sz = layer.scales_zeros  # [K/g, N', 2]
        return dequantize_int4(q, sz[..., 0].t(), sz[..., 1].t()).to(dtype)

    def dequantized(self, layer) -> torch.Tensor:
        """The weight this layer's GEMM path computes with, [N, K] fp32 (tests compare against it)."""
        if not hasattr(layer, "nibbles"):
            return dequantize_int4(layer.qweight, layer.scales, layer.zeros)
        return self._from_nibbles(layer, torch.float32)[: layer.out_features]
