"""Expert-parallel dispatch and combine with ``torch.distributed`` all-to-all.

The tokens reaching an MoE block are replicated over the TP group (attention ends in an
all-reduce). Each rank takes its contiguous ``ceil(T / ep)`` slice of them, sends every routed
assignment (the token's row and the expert's local id) to the rank owning that expert
(``all_to_all_single`` with uneven splits, after an all-to-all of the counts), computes the
experts it owns over what it received, sends the results back the same way, combines them with
the routing weights, and all-gathers the slices so every rank again holds every token's output.
gloo and NCCL both implement ``all_to_all_single`` with uneven splits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fleetlm.distributed.communication import _timed
from fleetlm.distributed.parallel_state import get_tp_group
from fleetlm.moe.routing import Routing


def all_to_all_experts(layer, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    ep, rank = layer.group_size, layer.group_rank
    t, k = routing.ids.shape
    dest_all, slot_all = destinations(layer, routing.ids)
    per = -(-t // ep)
    lo, hi = min(t, rank * per), min(t, (rank + 1) * per)
    dest, slots = dest_all[lo:hi].reshape(-1), slot_all[lo:hi].reshape(-1)
    weights = routing.weights[lo:hi].reshape(-1)
    dest = torch.where(dest >= 0, dest, ep)
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=ep + 1)[:ep]
    order = order[: int(send_counts.sum())]  # dropped assignments (dest == ep) sort last
    recv_counts = _exchange(send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    xs = x[lo:hi]
    rows = order // k
    got_x = _a2a(xs[rows].contiguous(), recv, send)
    got_slot = _a2a(slots[order].contiguous(), recv, send).unsqueeze(-1)
    y = layer.grouped_slots(got_x, got_slot, torch.ones_like(got_slot, dtype=torch.float32))
    back = _a2a(y, send, recv)
    out = torch.zeros_like(xs)
    out.index_add_(0, rows, back * weights[order].to(x.dtype).unsqueeze(-1))
    return _gather_slices(out, per, t)


def destinations(layer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(EP rank, local slot) of every assignment in ``ids`` [T, k] (-1 where dropped): the
    owner, or with replication the copy the adaptive routing picks. Counts each rank's load."""
    if layer.replication is not None:
        from fleetlm.moe.replication import assign_copies

        dest, slot, load = assign_copies(ids, layer.replication.placement)
    else:
        n_local = layer.num_local_experts
        dest = torch.where(ids >= 0, ids // n_local, -1)
        slot = torch.where(ids >= 0, ids % n_local, -1)
        load = torch.bincount(dest[dest >= 0], minlength=layer.group_size).tolist()
    if not torch.is_grad_enabled():
        layer.stats.rank_tokens = [a + b for a, b in zip(layer.stats.rank_tokens, load)]
    return dest, slot


@_timed("all_to_all")
def _a2a(src: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    dst = src.new_empty((sum(out_splits), *src.shape[1:]))
    dist.all_to_all_single(dst, src, out_splits, in_splits, group=get_tp_group())
    return dst


@_timed("all_to_all")
def _exchange(counts: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=get_tp_group())
    return out


@_timed("all_gather")
def _gather_slices(out: torch.Tensor, per: int, t: int) -> torch.Tensor:
    pad = out.new_zeros((per, *out.shape[1:]))
    pad[: out.shape[0]] = out
    parts = [torch.empty_like(pad) for _ in range(dist.get_world_size(get_tp_group()))]
    dist.all_gather(parts, pad, group=get_tp_group())
    return torch.cat(parts)[:t]
