"""Weight-only int8: one symmetric scale per output channel (W8A16).

``w[n, k] ≈ q[n, k] * scale[n]`` with ``q`` in [-127, 127] and ``scale = max_k |w[n, k]| / 127``.
On the CPU ``torch._weight_int8pack_mm`` computes ``x @ q.T * scale`` without materialising the
dequantized matrix (measured 3-4x faster than bf16 ``F.linear`` at batch 1 on SmolLM2 shapes and
~10x faster than dequantize + matmul); elsewhere the weight is dequantized per call. On a machine
with AVX512-VNNI, bf16 decode rows instead go to the compiled ``int8_q8_linear``, which rounds
them to int8 per 32 values and multiplies codes as integers (W8A8 for those rows; see
``base.int8_activation_kernels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.layers.linear import LinearMethod
from fleetlm.quantization.base import as_2d, drop_param, int8_activation_kernels, staging_weight


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale fp32 [N]) with ``w ≈ q * scale[:, None]``; all-zero rows get scale 1."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


GEMM_ROWS = 64  # from this many rows the packed GEMV kernels lose to dequantize + the dtype's GEMM
Q8_ROWS = 16  # below this many bf16 rows int8_q8_linear, where the machine has it


def needs_grad(x: torch.Tensor) -> bool:
    """The packed kernels have no backward: an input whose gradient is wanted avoids them."""
    return x.requires_grad and torch.is_grad_enabled()


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale).T`` in ``x``'s dtype; ``scale`` already in that dtype. Below
    ``GEMM_ROWS`` rows the int8 pack kernel (decode); from there, dequantize and GEMM (prefill,
    large batches: measured 239 ms vs 60 ms for 2048 x [3072, 576]). An input that needs its
    gradient (QLoRA training) always takes the differentiable GEMM path."""
    x2, lead = as_2d(x)
    decode = x2.device.type == "cpu" and x2.shape[0] < GEMM_ROWS and not needs_grad(x2)
    q8 = int8_activation_kernels() if decode and x2.dtype == torch.bfloat16 and x2.shape[0] < Q8_ROWS \
        and q.shape[1] % 64 == 0 else None
    if q8 is not None:
        y = q8.int8_q8_linear(x2, q, scale.float()[:, None], q.shape[1])
    elif decode and x2.dtype in (torch.bfloat16, torch.float32):
        y = torch._weight_int8pack_mm(x2, q, scale)
    else:
        y = F.linear(x2, q.to(x2.dtype) * scale[:, None])
    return y.reshape(*lead, q.shape[0])


class Int8LinearMethod(LinearMethod):
    """Quantized at load from a bf16/fp32 checkpoint, each TP rank its own slice."""

    def create_weights(self, layer, in_per_rank: int, out_per_rank: int, dtype: torch.dtype) -> None:
        staging_weight(layer, in_per_rank, out_per_rank, dtype)
        layer.act_dtype = dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, scale = quantize_int8_per_channel(drop_param(layer, "weight"))
        layer.register_buffer("qweight", q, persistent=False)
        layer.register_buffer("scales", scale.to(layer.act_dtype), persistent=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = int8_linear(x, layer.qweight, layer.scales)
        return y if bias is None else y + bias

    def dequantized(self, layer) -> torch.Tensor:
        return layer.qweight.float() * layer.scales.float()[:, None]
