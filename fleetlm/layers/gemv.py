"""``linear``: ``F.linear`` that sends decode-sized bf16 inputs to the compiled GEMV
(``csrc/gemv.cpp``).

At batch 1 every matmul is a matrix-vector product bound by reading the weight once; torch's
bf16 GEMM reached ~10-15 GB/s per core on these shapes, the GEMV streams each weight row once for
all rows of the input. Up to ``GEMV_ROWS`` input rows take it (from there the bf16 GEMM's matrix
units win); fp32 (the reference precision), other devices, inputs or weights that need a
gradient, and machines without the compiled ops or without AVX-512 keep ``F.linear``. Both accumulate in float32 and
round once to bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GEMV_ROWS = 4
_KERNEL: list = []  # [module or None], resolved on first use


def _kernel():
    if not _KERNEL:
        from fleetlm.ops import cpu_ops

        ops = cpu_ops()
        # the portable loop (no AVX-512) is no faster than torch's GEMM: keep F.linear there
        _KERNEL.append(ops if ops is not None and ops.gemv_isa() != "portable" else None)
    return _KERNEL[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    k = x.shape[-1]
    if (x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and x.numel() <= GEMV_ROWS * k
            and x.device.type == "cpu" and x.numel() and weight.stride(-1) == 1
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        ops = _kernel()
        if ops is not None:
            y = ops.bf16_gemv(x.reshape(-1, k).contiguous(), weight, bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])
    return F.linear(x, weight, bias)
