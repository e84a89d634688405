"""RMSNorm with the residual add folded in: ``norm(x, residual)`` returns
``(rmsnorm(x + residual), x + residual)``.

The implementation is chosen once, at construction: the compiled in-place kernel (one pass:
add, normalise, store) for bf16/fp16 on CPU when it builds, else the reference formula, which in
float32 follows transformers op for op (greedy outputs stay token-identical). The in-place kernel
cannot record gradients, so a forward that autograd records takes the reference formula.
"""

from __future__ import annotations

import torch
from torch import nn

from fleetlm.layers.fused import fused_ops_for


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.ops = fused_ops_for(dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: None = None) -> None:
        if tuple(param.shape) != tuple(loaded.shape):
            raise ValueError(f"weight has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
        with torch.no_grad():
            param.data.copy_(loaded)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.ops is not None and not (torch.is_grad_enabled() and x.requires_grad):
            return self._fused(x, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # one fused kernel (float accumulation, one rounding)
            return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h

    def _fused(self, x: torch.Tensor, residual: torch.Tensor | None):
        """In place: ``residual += x`` then ``x = norm(residual)``; without a residual, a copy is
        normalised (the caller keeps ``x`` as the residual stream)."""
        if residual is None:
            out = x.clone()
            self.ops.add_rms_norm_(out, None, self.weight, self.eps)
            return out
        x = x.contiguous()
        self.ops.add_rms_norm_(x, residual, self.weight, self.eps)
        return x, residual
