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
    ep, rank, n_local = layer.group_size, layer.group_rank, layer.num_local_experts
    t, k = routing.ids.shape
    per = -(-t // ep)
    lo, hi = min(t, rank * per), min(t, (rank + 1) * per)
    ids, weights = routing.ids[lo:hi].reshape(-1), routing.weights[lo:hi].reshape(-1)
    dest = torch.where(ids >= 0, ids // n_local, ep)
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=ep + 1)[:ep]
    order = order[: int(send_counts.sum())]  # dropped assignments (dest == ep) sort last
    recv_counts = _exchange(send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    xs = x[lo:hi]
    rows = order // k
    got_x = _a2a(xs[rows].contiguous(), recv, send)
    got_e = _a2a((ids[order] - dest[order] * n_local).contiguous(), recv, send)
    local_ids = (got_e + layer.first_expert).unsqueeze(-1)
    y = layer.grouped(got_x, local_ids, torch.ones_like(local_ids, dtype=torch.float32))
    back = _a2a(y, send, recv)
    out = torch.zeros_like(xs)
    out.index_add_(0, rows, back * weights[order].to(x.dtype).unsqueeze(-1))
    return _gather_slices(out, per, t)


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
