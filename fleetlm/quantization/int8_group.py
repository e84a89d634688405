"""Group-wise symmetric int8 weights, as GGUF Q8_0 ships them: ``w = q * scale[group]``, groups of
32 input weights, kept as shipped (codes int8, one fp32 scale per group).

Few rows are computed by a compiled CPU kernel: in bf16 on a machine with AVX512-VNNI (and the
input size a multiple of 64), ``int8_q8_linear`` (``csrc/int8_q8.cpp``) rounds the activations to
int8 per 32 values and multiplies codes as integers (W8A8 for those rows, as llama.cpp's Q8_0 dot
products; ``FLEETLM_INT8_ACTIVATIONS=0`` turns it off); otherwise ``int8_group_linear``
(``csrc/cpu_ops.cpp``, fp32 activations: each block of codes is widened once and used for up to
four input rows). More rows use the
dtype's GEMM on the dense weight: a layer's ``dense_twin()`` when it has one (a tied GGUF head: the
embedding table holds the same weights, dequantized), else the weight dequantized for the call
(one compiled pass). Machines without the compiled ops always dequantize.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.layers.linear import LinearMethod
from fleetlm.quantization.base import as_2d, int8_activation_kernels

# SmolLM2's 49152 x 576 head, 2 threads (`python benchmarks/quant_rows.py`): the kernel takes 1.0 ms
# for 1 row, 4.1 ms for 8 and 39 ms for 64; the bf16 GEMM on a dense copy 3.3-5.7 ms for 1-64 rows;
# dequantizing the head for the call adds ~17 ms.
_KERNEL_ROWS_WITH_TWIN = 8
_KERNEL_ROWS = 32


def dequantize_int8_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    g = k // scale.shape[1]
    return (q.float().reshape(n, k // g, g) * scale[..., None]).reshape(n, k)


class Int8GroupLinearMethod(LinearMethod):
    def __init__(self, group_size: int = 32) -> None:
        self.group_size = group_size

    def create_weights(self, layer, in_per_rank: int, out_per_rank: int, dtype: torch.dtype) -> None:
        if in_per_rank % self.group_size:
            raise ValueError(f"int8 groups of {self.group_size} do not divide this rank's input size {in_per_rank}")
        layer.act_dtype = dtype
        layer.qweight = nn.Parameter(torch.empty(out_per_rank, in_per_rank, dtype=torch.int8), requires_grad=False)
        layer.scales = nn.Parameter(torch.empty(out_per_rank, in_per_rank // self.group_size), requires_grad=False)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        from fleetlm.ops import cpu_ops

        layer.kernel = cpu_ops() if layer.qweight.device.type == "cpu" else None
        if layer.kernel is not None and layer.qweight.shape[1] % 64 == 0 and self.group_size in (16, 32):
            layer.q8_kernel = int8_activation_kernels()

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2, lead = as_2d(x)
        twin = layer.dense_twin() if hasattr(layer, "dense_twin") else None
        if twin is not None and twin.dtype != x2.dtype:
            twin = None
        rows = _KERNEL_ROWS if twin is None else _KERNEL_ROWS_WITH_TWIN
        if getattr(layer, "q8_kernel", None) is not None and x2.shape[0] <= rows and x2.dtype == torch.bfloat16:
            y = layer.q8_kernel.int8_q8_linear(x2, layer.qweight, layer.scales, self.group_size)
        elif layer.kernel is not None and x2.shape[0] <= rows:
            y = layer.kernel.int8_group_linear(x2.float(), layer.qweight, layer.scales, self.group_size).to(x.dtype)
        elif twin is not None:
            y = F.linear(x2, twin)
        elif layer.kernel is not None:
            y = F.linear(x2, layer.kernel.int8_group_dequant(layer.qweight, layer.scales, self.group_size, x2.dtype))
        else:
            y = F.linear(x2, self.dequantized(layer).to(x2.dtype))
        y = y.reshape(*lead, y.shape[-1])
        return y if bias is None else y + bias

    def dequantized(self, layer) -> torch.Tensor:
        return dequantize_int8_groups(layer.qweight, layer.scales)
