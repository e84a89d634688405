"""Rotary position embeddings (the "rotate half" layout), with Llama-3 and linear scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fleetlm.layers.fused import fused_ops_for


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind == "freq_factors":  # GGUF rope_freqs tensor: per-frequency divisors (Llama-3.1 GGUFs)
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: linear, llama3, freq_factors)")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables; rotates the q and k heads of a fused qkv projection output.

    The sin table is stored with its first half negated so that ``rotate_half(x) * sin`` becomes
    ``roll(x, half) * sin_signed``: the same products, one op fewer. For bf16/fp16 on CPU (chosen
    at construction) the compiled kernel rotates in place in the qkv buffer."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        sin[:, : head_dim // 2].neg_()
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_signed", sin.to(dtype), persistent=False)
        self.head_dim = head_dim
        self.half = head_dim // 2
        self.ops = fused_ops_for(dtype)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, num_rotated_heads: int) -> torch.Tensor:
        """``qkv`` [..., heads * head_dim]: rotates its first ``num_rotated_heads`` heads (q then
        k); returns [..., heads, head_dim] (the same storage when rotated in place)."""
        d = self.head_dim
        if self.ops is not None and qkv.dim() == 2 and not (torch.is_grad_enabled() and qkv.requires_grad):
            self.ops.rope_(qkv, num_rotated_heads, d, self.cos, self.sin_signed, positions)
            return qkv.view(qkv.shape[0], -1, d)
        x = qkv.view(*qkv.shape[:-1], -1, d)
        cos, sin = self.cos[positions].unsqueeze(-2), self.sin_signed[positions].unsqueeze(-2)
        qk = x[..., :num_rotated_heads, :]
        qk = qk * cos + qk.roll(self.half, dims=-1) * sin
        return torch.cat((qk, x[..., num_rotated_heads:, :]), dim=-2)
