"""KV-cache dtypes: ``auto`` (the model dtype), ``int8`` (per token and head scales), ``fp8_e4m3``."""

from __future__ import annotations

KV_CACHE_DTYPES = ("auto",)


def check_kv_cache_dtype(name: str, device: str) -> None:
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not known; accepted: {', '.join(KV_CACHE_DTYPES)}")
