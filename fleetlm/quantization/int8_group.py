"""Group-wise symmetric int8 weights, as GGUF Q8_0 ships them: ``w = q * scale[group]``, groups of
32 input weights, kept as shipped (codes int8, one fp32 scale per group).

Computed by the compiled ``int8_group_linear`` CPU kernel (``csrc/cpu_ops.cpp``: each weight
block is widened once and used for every row) for up to ``_KERNEL_ROWS`` rows; longer inputs
(prefill) and machines without the compiled ops dequantize to the activation dtype and use its GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.layers.linear import LinearMethod
from fleetlm.quantization.base import as_2d

# The kernel costs ~0.9 ms per row for SmolLM2's 49152 x 576 head (one thread); dequantizing the
# head costs ~57 ms whatever the rows: the kernel wins up to about 64 rows (a decode batch of 16
# plus its speculative drafts stays on it)
_KERNEL_ROWS = 64


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

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2, lead = as_2d(x)
        if layer.kernel is not None and x2.shape[0] <= _KERNEL_ROWS:
            y = layer.kernel.int8_group_linear(x2.float(), layer.qweight, layer.scales, self.group_size).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantized(layer).to(x2.dtype))
        y = y.reshape(*lead, y.shape[-1])
        return y if bias is None else y + bias

    def dequantized(self, layer) -> torch.Tensor:
        return dequantize_int8_groups(layer.qweight, layer.scales)
