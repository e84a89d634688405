"""The collectives the model and the runner use, as small functions over this rank's groups.

Each is a no-op (or the identity) in a group of one, so a single process pays nothing. Time spent
inside them is added to ``COMM_SECONDS`` by kind (what the parallel benchmark reports as the
share of a step spent in collectives; ``recv`` is a later stage waiting for an earlier one).
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from fleetlm.distributed.parallel_state import get_pp_group, get_tp_group, parallel_state

COMM_SECONDS: dict[str, float] = defaultdict(float)
COMM_CALLS: dict[str, int] = defaultdict(int)


def _timed(kind: str):
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                COMM_SECONDS[kind] += time.perf_counter() - t0
                COMM_CALLS[kind] += 1
        return inner
    return wrap


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the TP group (in place when it can; returns the result). Under autograd
    its gradient passes through unchanged: every rank computes the same loss from the sum."""
    if parallel_state().tp_size == 1:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _ReduceFromTP.apply(x)
    _all_reduce(x)
    return x


@_timed("all_reduce")
def _all_reduce(x: torch.Tensor) -> None:
    dist.all_reduce(x, group=get_tp_group())


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; under autograd, the input's gradient is summed over the TP group (each
    rank's column shard contributes a part of it)."""
    if parallel_state().tp_size == 1 or not (x.requires_grad and torch.is_grad_enabled()):
        return x
    return _CopyToTP.apply(x)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=get_tp_group())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=get_tp_group())
        return grad


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every TP rank's ``x`` along ``dim`` (rank order)."""
    tp = parallel_state().tp_size
    if tp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp)]
    _all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


@_timed("all_gather")
def _all_gather(parts: list[torch.Tensor], x: torch.Tensor) -> None:
    dist.all_gather(parts, x, group=get_tp_group())


def tensor_model_parallel_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
    """Concatenation of every TP rank's ``x`` on TP rank 0 only (None elsewhere): the LM head's
    logits are needed only where sampling happens."""
    st = parallel_state()
    if st.tp_size == 1:
        return x
    group = get_tp_group()
    dst = dist.get_global_rank(group, 0)
    parts = [torch.empty_like(x) for _ in range(st.tp_size)] if st.tp_rank == 0 else None
    _gather(x.contiguous(), parts, dst, group)
    return torch.cat(parts, dim=dim) if parts is not None else None


@_timed("gather")
def _gather(x: torch.Tensor, parts: list[torch.Tensor] | None, dst: int, group) -> None:
    dist.gather(x, parts, dst=dst, group=group)


@_timed("send")
def send_to_next_stage(x: torch.Tensor) -> dist.Work:
    """Start sending a stage's output hidden states to the next stage (same TP rank)."""
    return dist.isend(x.contiguous(), dst=parallel_state().next_stage_rank, group=get_pp_group())


@_timed("recv")
def recv_from_prev_stage(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Receive the previous stage's hidden states (blocks until they arrive)."""
    buf = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buf, src=parallel_state().prev_stage_rank, group=get_pp_group())
    return buf
