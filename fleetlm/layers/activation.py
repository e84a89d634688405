"""``SiluAndMul``: ``silu(gate) * up`` over a fused ``[.., 2n]`` gate/up output; one compiled
pass on CPU for bf16/fp16 (chosen at construction), the reference formula otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.layers.fused import fused_ops_for


class SiluAndMul(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.ops = fused_ops_for(dtype)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.ops is not None and gate_up.dim() == 2 and not (torch.is_grad_enabled() and gate_up.requires_grad):
            return self.ops.silu_and_mul(gate_up)
        n = gate_up.shape[-1] // 2
        return F.silu(gate_up[..., :n]) * gate_up[..., n:]
