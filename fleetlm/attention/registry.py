"""Attention backends by name; ``auto`` picks the fastest that works on the device."""

from __future__ import annotations

import torch

from fleetlm.attention.base import AttentionBackend

BACKENDS = ("auto", "torch_paged", "cpu_native")


def get_attention_backend(name: str, device: torch.device, block_size: int, dtype: torch.dtype,
                          kv_cache_dtype: str = "auto") -> AttentionBackend:
    """``kv_cache_dtype``: auto | int8 | fp8_e4m3 (fleetlm/quantization/kv.py); both backends read each."""
    from fleetlm.quantization.kv import kv_format

    fmt = kv_format(kv_cache_dtype)
    if name not in BACKENDS:
        raise ValueError(f"attention_backend {name!r} is not known; choose one of: {', '.join(BACKENDS)}")
    if name == "auto":
        name = "torch_paged"
        if device.type == "cpu":
            from fleetlm.ops import cpu_ops

            name = "cpu_native" if cpu_ops() is not None else "torch_paged"
    if name == "cpu_native":
        if device.type != "cpu":
            raise ValueError("attention_backend 'cpu_native' runs on the CPU only")
        from fleetlm.attention.cpu_native import CpuNativeBackend

        return CpuNativeBackend(block_size, dtype, fmt)
    from fleetlm.attention.torch_paged import TorchPagedBackend

    return TorchPagedBackend(block_size, dtype, fmt)
