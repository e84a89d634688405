"""AdamW, warmup + cosine learning rate, and the global gradient norm (clipping).

The norm is the norm of the whole model's gradient, whatever the layout: FSDP2 gradients are
DTensor shards (their squared sums are reduced over the mesh), TP-sharded parameters add their
squares over the TP group, replicated ones count once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from fleetlm.distributed.parallel_state import get_tp_group, parallel_state
from fleetlm.train.config import OptimizerSection, ScheduleSection

# parameter-name fragments of the layers whose weights each TP rank holds a slice of
TP_SHARDED = ("qkv_proj.", "gate_up_proj.", "o_proj.weight", "down_proj.weight", "embed_tokens.",
              "lm_head.")


def build_optimizer(params: Iterable[nn.Parameter], sec: OptimizerSection) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(params), lr=sec.lr, betas=sec.betas, eps=sec.eps,
                             weight_decay=sec.weight_decay, foreach=False)


def lr_factor(step: int, total: int, sec: ScheduleSection) -> float:
    """Multiplier of the base LR at ``step`` (0-based): linear warmup, then cosine or constant."""
    if step < sec.warmup_steps:
        return (step + 1) / sec.warmup_steps
    if sec.kind == "constant":
        return 1.0
    span = max(1, total - sec.warmup_steps - 1)
    progress = min(1.0, (step - sec.warmup_steps) / span)
    return sec.min_lr_ratio + (1 - sec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _is_tp_sharded(name: str) -> bool:
    return parallel_state().tp_size > 1 and any(f in name for f in TP_SHARDED)


def grad_norm(named: list[tuple[str, nn.Parameter]], across_stages: bool = False) -> torch.Tensor:
    """The whole model's gradient norm; ``across_stages``: each rank holds a different part of
    the model (pipeline stages), so the squares are summed over every rank."""
    from torch.distributed.tensor import DTensor

    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for name, p in named:
        if p.grad is None:
            continue
        norm = torch.linalg.vector_norm(p.grad)  # no float64 copy of the gradient
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        sq = norm.double() ** 2
        if _is_tp_sharded(name):
            sharded += sq
        else:
            replicated += sq
    if parallel_state().tp_size > 1:
        dist.all_reduce(sharded, group=get_tp_group())
    total = sharded + replicated
    if across_stages:
        dist.all_reduce(total)
    return total.sqrt()


def clip_grads(named: list[tuple[str, nn.Parameter]], max_norm: float | None,
               across_stages: bool = False) -> float:
    """Scale every gradient so the global norm is at most ``max_norm``; returns the norm before."""
    norm = float(grad_norm(named, across_stages))
    if max_norm is not None and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for _, p in named:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
