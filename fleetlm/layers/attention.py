"""The model-facing attention layer: reads the step's metadata from the forward context."""

from __future__ import annotations

import torch
from torch import nn

from fleetlm.attention.base import get_forward_context


class Attention(nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        return ctx.backend.forward(q, k, v, ctx.kv_caches[self.layer_idx], ctx.meta)
