"""KV-cache arithmetic: the single source of truth the engine sizes its cache with.

The engine's cache is one tensor ``[num_layers, 2, num_blocks, block_size, num_kv_heads,
head_dim]`` in the KV dtype, so its size is exactly
``num_blocks * block_size * kv_cache_bytes_per_token(...)``.
"""

from __future__ import annotations


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                             dtype_bytes: int) -> int:
    """Bytes one token occupies in the KV cache: K and V, every layer and KV head.

    ``2 * num_layers * num_kv_heads * head_dim * dtype_bytes``. Llama-3.1-70B in fp16
    (80 layers, 8 KV heads, head_dim 128): 327,680 B = 320 KiB per token, so 1.25 GiB for a
    4,096-token sequence and 40 GiB for 131,072 tokens.
    """
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("dtype_bytes", dtype_bytes)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def kv_cache_num_blocks(budget_bytes: int, block_size: int, bytes_per_token: int) -> int:
    """How many ``block_size``-token blocks fit in ``budget_bytes``: ``floor(budget / (bs * bpt))``.

    Raises ``ValueError`` if the budget cannot hold even one block (the engine must not start
    with a cache that can serve nothing).
    """
    if block_size < 1 or bytes_per_token < 1:
        raise ValueError(f"block_size and bytes_per_token must be >= 1, got {block_size}, "
                         f"{bytes_per_token}")
    block_bytes = block_size * bytes_per_token
    blocks = int(budget_bytes) // block_bytes
    if blocks < 1:
        raise ValueError(
            f"KV-cache budget of {int(budget_bytes):,} bytes cannot hold one block of {block_size} "
            f"tokens ({block_bytes:,} bytes); free memory or lower the weight/activation footprint"
        )
    return blocks
