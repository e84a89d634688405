"""``linear``: ``F.linear`` that sends decode-sized bf16 inputs to the compiled GEMV
(``csrc/gemv.cpp``), and larger bf16 inputs to oneDNN with the weight prepacked.

At batch 1 every matmul is a matrix-vector product bound by reading the weight once; torch's
bf16 GEMM reached ~10-15 GB/s per core on these shapes, the GEMV streams each weight row once for
all rows of the input. Up to ``GEMV_ROWS`` input rows take it (from there the bf16 GEMM's matrix
units win); fp32 (the reference precision), other devices, inputs or weights that need a
gradient, and machines without the compiled ops or without AVX-512 keep ``F.linear``. Both accumulate in float32 and
round once to bf16.

From ``GEMV_ROWS + 1`` rows (decode batches, prefill) a layer that passes itself as ``owner``
multiplies by a copy of its weight in oneDNN's blocked layout (``mkldnn._reorder_linear_weight``,
made on first use and remade if the weight changes in place): ``F.linear`` reorders the weight
on every call, which read SmolLM2's 120 distinct layers at 11 GB/s against 15-16 GB/s prepacked
(1.4x at 16 rows, 1.3x at 256, 1.08x at 2048; identical results; benchmarks/RESULTS.md, issue 17
third pass). Only where oneDNN has bf16 kernels (AVX512-BF16 or AMX); ``FLEETLM_PREPACK=0`` turns
it off. The copy costs the weight's bytes again (bf16 layers on the CPU only).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

GEMV_ROWS = 4
_KERNEL: list = []  # [module or None], resolved on first use
_PREPACK: list = []  # [bool], resolved on first use


def _kernel():
    if not _KERNEL:
        from fleetlm.ops import cpu_ops

        ops = cpu_ops()
        # the portable loop (no AVX-512) is no faster than torch's GEMM: keep F.linear there
        _KERNEL.append(ops if ops is not None and ops.gemv_isa() != "portable" else None)
    return _KERNEL[0]


def _prepack_enabled() -> bool:
    if not _PREPACK:
        _PREPACK.append(os.environ.get("FLEETLM_PREPACK", "1") != "0" and torch.backends.mkldnn.is_available()
                        and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return _PREPACK[0]


def prepacked(owner: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's blocked layout, cached on ``owner`` until the weight changes."""
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    cached = getattr(owner, "_prepacked", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        owner._prepacked = cached
    return cached[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           owner: torch.nn.Module | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; ``owner`` (the layer holding ``weight``) may keep a prepacked copy."""
    k = x.shape[-1]
    if (x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and x.device.type == "cpu" and x.numel()
            and weight.stride(-1) == 1 and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        if x.numel() <= GEMV_ROWS * k:
            ops = _kernel()
            if ops is not None:
                y = ops.bf16_gemv(x.reshape(-1, k).contiguous(), weight, bias)
                return y.reshape(*x.shape[:-1], y.shape[-1])
        elif owner is not None and _prepack_enabled():
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, k), prepacked(owner, weight), bias, "none", [], "")
            return y.reshape(*x.shape[:-1], y.shape[-1])
    return F.linear(x, weight, bias)
