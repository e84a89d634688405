"""Moving K/V between the paged cache and the staged layout, per rank.

Cache (one rank): ``[this stage's layers, 2, num_blocks, block_size, this rank's kv_heads,
head_dim]``. Staged: ``[blocks, all layers, 2, block_size, all kv_heads, head_dim]``.

Tensor parallelism splits the KV heads: rank ``r`` of ``tp`` holds ``max(1, H / tp)`` heads
starting at ``(r // replicas) * per_rank`` where ``replicas = max(1, tp / H)`` (ranks past the
number of heads replicate them; ``layers/linear.py: QKVParallelLinear``). A producer merges its
ranks' slices (one copy of each head), a consumer's ranks each take their own slice, so P and D
may run different TP sizes.
"""

from __future__ import annotations

import hashlib

import torch


def kv_head_range(tp_rank: int, tp_size: int, num_kv_heads: int) -> range:
    per_rank = max(1, num_kv_heads // tp_size)
    replicas = max(1, tp_size // num_kv_heads)
    start = tp_rank // replicas * per_rank
    return range(start, start + per_rank)


def export_blocks(kv_cache: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """This rank's K/V of ``block_ids``, block-major: ``[n, layers, 2, bs, heads, hd]``."""
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    return kv_cache.index_select(2, idx).permute(2, 0, 1, 3, 4, 5).contiguous().cpu()


def import_blocks(kv_cache: torch.Tensor, block_ids: list[int], staged: torch.Tensor, layers: range,
                  heads: range) -> None:
    """Write this rank's part (its layers, its heads) of ``staged`` into ``block_ids``."""
    if not block_ids:
        return
    part = staged[:, layers.start:layers.stop, :, :, heads.start:heads.stop]
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    kv_cache.index_copy_(2, idx, part.permute(1, 2, 0, 3, 4, 5).to(kv_cache.device, kv_cache.dtype))


def merge_rank_exports(parts: list[tuple[range, range, torch.Tensor]], num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """One staged tensor from every rank's ``(layers, heads, export)``; replicated heads once."""
    n, _, _, bs, _, hd = parts[0][2].shape
    out = torch.empty((n, num_layers, 2, bs, num_kv_heads, hd), dtype=parts[0][2].dtype)
    for layers, heads, t in parts:
        out[:, layers.start:layers.stop, :, :, heads.start:heads.stop] = t
    return out


def weights_digest(model: torch.nn.Module) -> str:
    """A cheap identity of the checkpoint: sha256 of the first rows of the first-stage embedding
    (or of the first parameter), as fp32 bytes."""
    params = dict(model.named_parameters())
    name = next((n for n in sorted(params) if "embed" in n), next(iter(params)))
    rows = params[name].detach()[:4].float().cpu().contiguous()
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]
