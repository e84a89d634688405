"""Context parallelism (CP) for training: each of ``cp`` ranks holds a slice of every sequence.

**All-gather CP, not ring attention.** PyTorch's ``context_parallel`` (ring attention over
DTensor) registers sharding rules only for the CUDA SDPA kernels (flash, efficient, cuDNN);
on CPU it fails with "aten._scaled_dot_product_flash_attention_for_cpu.default does not have
a sharding strategy registered". So fleetlm does what Llama 3's training describes: every rank
all-gathers the keys and values of the whole sequence (differentiably: ``_GatherKV``, whose
backward sums each rank's K/V gradient from every rank's queries; torch's
``torch.distributed.nn.functional.all_gather`` has that backward too, but on gloo it scatters from
global rank numbers and fails in a CP group that is not ranks ``0 .. cp-1``) and attends its local queries to them. K/V are ``2 * kv_heads * d``
per token, small next to activations with grouped-query attention, and one all-gather per layer
is simpler to overlap than ``cp - 1`` ring steps; the cost is holding the full sequence's K/V.
On CUDA, CP is refused (``check_cp``): the ring path there is not wired, and this path is not
tested on GPUs.

**Load balance.** The sequence of ``T`` tokens is cut into ``2 cp`` chunks of ``c = T / (2 cp)``;
rank ``i`` holds chunks ``i`` and ``2 cp - 1 - i``. Under a causal mask chunk ``g`` attends to
``(g + 1) c`` keys, so every rank's two chunks attend to ``(2 cp + 1) c`` keys in all: the same
work on every rank. Each chunk is one SDPA call over just the keys it can see (a prefix of the
sequence, gathered back into natural order) with a causal mask offset by its start.

**Positions.** RoPE uses each token's global position (``CPShard.positions``).

**Loss and gradients.** Every rank holds the same number of tokens, so the mean of the ranks'
local mean losses is the mean over the global batch, as in one process. The data-parallel
wrapper reduces gradients over ``dp x cp`` ranks (``replicate`` over the ``cp`` mesh dimension,
or ``fully_shard`` over the flattened ``(dp_shard, cp)`` mesh, as torchtitan does): the average of
the per-rank gradients, each already holding the cross-rank K/V terms, is the gradient of that
global mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from fleetlm.train.config import TrainConfig


def check_cp(cfg: TrainConfig) -> None:
    """Layouts CP does not compose with, and sequence lengths it cannot split: a ``ValueError``
    naming the setting (raised from ``check_config``, before any process group or step)."""
    p, seq = cfg.parallelism, cfg.data.seq_len
    if p.cp == 1:
        return
    if seq % (2 * p.cp):
        raise ValueError(f"parallelism.cp = {p.cp} needs data.seq_len ({seq}) divisible by 2 x cp = "
                         f"{2 * p.cp} (load-balanced chunks: rank i holds chunks i and 2cp-1-i)")
    if p.pp > 1 or p.tp > 1:
        raise ValueError("parallelism.cp composes with dp_shard (FSDP) only, not with tp or pp")
    if p.dp_replicate > 1:
        raise ValueError("parallelism.cp composes with dp_shard (FSDP), not dp_replicate")
    if p.compile:
        raise ValueError("parallelism.compile is not supported with parallelism.cp")
    if cfg.lora.r:
        raise ValueError("LoRA with parallelism.cp is not supported")
    if torch.cuda.is_available():
        raise ValueError("parallelism.cp on CUDA is not supported: fleetlm's CP is all-gather "
                         "attention tested on CPU (gloo); PyTorch's ring attention is not wired yet")


@dataclass(frozen=True)
class CPShard:
    """Which chunks of each sequence this CP rank holds (see the module doc)."""

    rank: int
    size: int

    @property
    def chunks(self) -> tuple[int, int]:
        return self.rank, 2 * self.size - 1 - self.rank

    def positions(self, seq_len: int) -> torch.Tensor:
        """Global positions of the local tokens, ``[2 c]``."""
        c = seq_len // (2 * self.size)
        return torch.cat([torch.arange(g * c, (g + 1) * c) for g in self.chunks])

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's two chunks of ``x [B, T]`` along the sequence, ``[B, 2 c]``."""
        c = x.shape[1] // (2 * self.size)
        return torch.cat([x[:, g * c : (g + 1) * c] for g in self.chunks], dim=1)

    def natural_order(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Every rank's local ``[B, 2 c, ...]`` tensor (in rank order) -> ``[B, T, ...]`` in
        sequence order: chunk ``g < cp`` is rank ``g``'s first half, the others the second half
        of rank ``2 cp - 1 - g``."""
        c = parts[0].shape[1] // 2
        n = self.size
        return torch.cat([parts[g][:, :c] if g < n else parts[2 * n - 1 - g][:, c:] for g in range(2 * n)], dim=1)


def _offset_causal_mask(start: int, rows: int, keys: int, device: torch.device) -> torch.Tensor:
    """``[rows, keys]`` boolean: query ``start + i`` sees keys ``0 .. start + i``."""
    q = torch.arange(start, start + rows, device=device)
    return torch.arange(keys, device=device)[None, :] <= q[:, None]


class _GatherKV(torch.autograd.Function):
    """All-gather along a new leading dim; backward: the sum over ranks of the gradient of
    this rank's piece (a reduce-scatter, done as an all-reduce since gloo has no
    reduce-scatter)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, rank: int) -> torch.Tensor:
        ctx.group, ctx.rank = group, rank
        out = local.new_empty((dist.get_world_size(group), *local.shape))
        dist.all_gather(list(out.unbind(0)), local.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None


class CPAttention(nn.Module):
    """Stands in for the model's ``Attention`` (no parameters, so names do not change):
    local queries ``[B, 2 c, H, D]`` against the whole sequence's gathered K/V."""

    def __init__(self, layer_idx: int, shard: CPShard, group) -> None:
        super().__init__()
        self.layer_idx, self.shard, self.group = layer_idx, shard, group
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def _mask(self, g: int, c: int, device: torch.device) -> torch.Tensor:
        if (g, c) not in self._masks:
            self._masks = {k: v for k, v in self._masks.items() if k[1] == c}
            self._masks[(g, c)] = _offset_causal_mask(g * c, c, (g + 1) * c, device)
        return self._masks[(g, c)]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.dim() != 4:
            raise ValueError("context-parallel attention takes [B, T, heads, D] (training mode only)")
        hkv, c = k.shape[2], q.shape[1] // 2
        parts = _GatherKV.apply(torch.cat([k, v], dim=2), self.group, self.shard.rank)
        kv = self.shard.natural_order(parts.unbind(0))
        keys, values = kv[:, :, :hkv].transpose(1, 2), kv[:, :, hkv:].transpose(1, 2)
        outs = []
        for j, g in enumerate(self.shard.chunks):
            n = (g + 1) * c
            qj = q[:, j * c : (j + 1) * c].transpose(1, 2)
            outs.append(F.scaled_dot_product_attention(qj, keys[:, :, :n], values[:, :, :n],
                                                       attn_mask=self._mask(g, c, q.device), enable_gqa=True))
        return torch.cat(outs, dim=2).transpose(1, 2)


def install_cp_attention(model: nn.Module, shard: CPShard, group) -> int:
    """Replace every causal ``Attention`` of ``model`` with ``CPAttention``; the count replaced
    (a model with none is an error: CP would silently attend locally)."""
    from fleetlm.layers.attention import Attention

    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is Attention:
                setattr(module, name, CPAttention(child.layer_idx, shard, group))
                n += 1
    if n == 0:
        raise ValueError("parallelism.cp: this model has no attention layer that context parallelism can replace")
    return n
