"""KV-cache dtypes: ``auto`` (the model dtype), ``int8`` (per token and head scales), ``fp8_e4m3``.

Storage (the cache stays one tensor ``[layers, 2, blocks, block_size, kv_heads, head_size]``, so
blocks move, hash and transfer as before):

- ``int8``: ``head_size = head_dim + 2``: each head row of a token holds its int8 codes, then
  its fp16 scale in the last two bytes. ``scale = max |x| / 127`` per (token, head) for K and for
  V; ``x ≈ q * scale``.
- ``fp8_e4m3``: ``torch.float8_e4m3fn``, no scale (1.0, as vLLM's default); values are clamped to
  ±448 (the format's largest finite value) before the cast.

Both attention backends (``torch_paged`` dequantizes the blocks it gathers; ``cpu_native``'s
compiled decode kernel reads codes and scales in place) read them. Bytes per token:
``2 * layers * kv_heads * head_size * element bytes`` (``plan.kv_cache_bytes_per_token``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")
FP8_MAX = 448.0
SCALE_BYTES = 2  # fp16 per (token, head) row of an int8 cache


def check_kv_cache_dtype(name: str, device: str) -> None:
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not known; accepted: {', '.join(KV_CACHE_DTYPES)}")
    if name == "fp8_e4m3" and not hasattr(torch, "float8_e4m3fn"):
        raise ValueError("kv_cache_dtype 'fp8_e4m3' needs torch.float8_e4m3fn, which this torch lacks; "
                         f"accepted here: {', '.join(n for n in KV_CACHE_DTYPES if n != 'fp8_e4m3')}")


@dataclass(frozen=True)
class KVFormat:
    """How K/V rows are stored; ``None`` in place of one means: the model dtype, as before."""

    name: str
    storage: torch.dtype
    extra: int  # bytes after the head_dim codes of each head row

    def head_size(self, head_dim: int) -> int:
        return head_dim + self.extra

    def write(self, cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Store ``x`` [T, Hkv, D] at flat ``slots`` of one of K/V: ``cache`` [blocks, bs, Hkv, size]."""
        rows = cache.view(-1, *cache.shape[-2:]).view(torch.uint8)  # byte views: no fp8 index kernels needed
        rows.index_copy_(0, slots, self.encode(x).view(torch.uint8))

    def gather(self, cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``cache[:, block_ids]`` (K and V of those blocks) dequantized to ``dtype``."""
        return self.decode(cache.view(torch.uint8)[:, block_ids].view(self.storage), dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "fp8_e4m3":
            return x.float().clamp_(-FP8_MAX, FP8_MAX).to(self.storage)
        xf = x.float()
        scale = (xf.abs().amax(-1, keepdim=True) / 127.0).clamp_(min=1e-8).half()
        q = torch.round(xf / scale.float()).clamp_(-127, 127).to(torch.int8)
        return torch.cat([q, scale.view(torch.int8)], dim=-1)

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stored rows [..., size] -> values [..., head_dim] in ``dtype``."""
        if self.name == "fp8_e4m3":
            return stored.to(dtype)
        d = stored.shape[-1] - SCALE_BYTES
        scale = stored[..., d:].contiguous().view(torch.float16)
        return (stored[..., :d].float() * scale.float()).to(dtype)


def kv_format(name: str) -> KVFormat | None:
    if name == "auto":
        return None
    if name == "int8":
        return KVFormat("int8", torch.int8, SCALE_BYTES)
    if name == "fp8_e4m3":
        return KVFormat("fp8_e4m3", torch.float8_e4m3fn, 0)
    raise ValueError(f"kv_cache_dtype {name!r} is not known; accepted: {', '.join(KV_CACHE_DTYPES)}")
