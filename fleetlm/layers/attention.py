"""The model-facing attention layer.

Serving: inside ``forward_context`` (set by the model runner) it writes K/V into this layer's
paged cache and attends through the step's attention backend; q/k/v are ``[T, heads, D]``.
Training and plain use: with no forward context it is causal SDPA over ``[B, T, heads, D]``
(or ``[T, heads, D]``, one sequence), differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.attention.base import current_forward_context


class Attention(nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = current_forward_context()
        if ctx is not None:
            return ctx.backend.forward(q, k, v, ctx.kv_caches[self.layer_idx], ctx.meta)
        return causal_sdpa(q, k, v)


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over ``[B, T, H, D]`` (or ``[T, H, D]``), grouped KV heads allowed."""
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q[None], k[None], v[None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True).transpose(1, 2)
    return out[0] if squeeze else out
