"""Hot-expert replication and adaptive routing for expert parallelism.

Each of the ``ep`` ranks owns ``E / ep`` experts (expert ``e`` lives on rank ``e // (E / ep)``)
and has ``slots`` spare expert slots. From the per-expert load observed since the last
rebalance, ``plan_replicas`` fills the spare slots with redundant copies of the hottest experts,
each placed on the least-loaded rank that does not hold that expert yet (greedy: the expert
whose load per copy is highest gets the next copy). Every rank computes the same plan from the
same counts (routing is replicated over the TP group), so no agreement round is needed.

``assign_copies`` is the adaptive routing: the assignments of an expert with copies are split
among them so that the ranks' loads level out (water filling from the load the other experts
already put on each rank); an expert's assignments in token order fill its copies in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """``copies[e]``: the (rank, local slot) pairs holding expert ``e``, its owner first."""

    num_experts: int
    ep_size: int
    slots: int  # spare slots per rank (local slot ids E/ep .. E/ep + slots - 1)
    copies: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def local(self) -> int:
        return self.num_experts // self.ep_size

    def slot_experts(self, rank: int) -> list[int]:
        """Expert held in each spare slot of ``rank`` (-1: empty)."""
        out = [-1] * self.slots
        for e, cs in enumerate(self.copies):
            for r, s in cs[1:]:
                if r == rank:
                    out[s - self.local] = e
        return out

    def replicated(self) -> tuple[int, ...]:
        return tuple(e for e, cs in enumerate(self.copies) if len(cs) > 1)


def owner_placement(num_experts: int, ep: int, slots: int) -> Placement:
    local = num_experts // ep
    return Placement(num_experts, ep, slots, tuple(((e // local, e % local),) for e in range(num_experts)))


def plan_replicas(load: list[float], ep: int, slots: int) -> Placement:
    """Fill every rank's spare slots with copies of the hottest experts (module docstring)."""
    n = len(load)
    local = n // ep
    copies = [[(e // local, e % local)] for e in range(n)]
    rank_load = [0.0] * ep
    for e, x in enumerate(load):
        rank_load[e // local] += x
    free = [slots] * ep
    for _ in range(ep * slots):
        e = max(range(n), key=lambda i: (load[i] / len(copies[i]), -i))
        holders = {r for r, _ in copies[e]}
        cands = [r for r in range(ep) if free[r] and r not in holders]
        if not cands or load[e] <= 0:
            break
        r = min(cands, key=lambda i: (rank_load[i], i))
        c = len(copies[e])
        for h in holders:  # the expert's load is now split over c + 1 copies
            rank_load[h] -= load[e] / c - load[e] / (c + 1)
        rank_load[r] += load[e] / (c + 1)
        copies[e].append((r, local + slots - free[r]))
        free[r] -= 1
    return Placement(n, ep, slots, tuple(tuple(c) for c in copies))


def assign_copies(ids: torch.Tensor, p: Placement) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(destination rank, local slot) per assignment of ``ids`` [T, k] (-1 where dropped), and
    the resulting per-rank load. Unreplicated experts go to their owner; replicated ones are
    water-filled over their copies."""
    flat = ids.reshape(-1)
    valid = flat >= 0
    counts = torch.bincount(flat[valid], minlength=p.num_experts).tolist()
    rank_load = [0] * p.ep_size
    for e, c in enumerate(counts):
        if len(p.copies[e]) == 1:
            rank_load[p.copies[e][0][0]] += c
    quotas: dict[int, list[int]] = {}
    for e in sorted((e for e in range(p.num_experts) if len(p.copies[e]) > 1), key=lambda e: (-counts[e], e)):
        q = _water_fill([rank_load[r] for r, _ in p.copies[e]], counts[e])
        quotas[e] = q
        for (r, _), x in zip(p.copies[e], q):
            rank_load[r] += x
    rank = torch.full_like(flat, -1)
    slot = torch.full_like(flat, -1)
    owner = torch.tensor([cs[0][0] for cs in p.copies])
    own_slot = torch.tensor([cs[0][1] for cs in p.copies])
    rank[valid], slot[valid] = owner[flat[valid]], own_slot[flat[valid]]
    for e, q in quotas.items():
        where = (flat == e).nonzero().flatten()
        start = 0
        for (r, s), x in zip(p.copies[e], q):
            rank[where[start : start + x]], slot[where[start : start + x]] = r, s
            start += x
    return rank.view_as(ids), slot.view_as(ids), rank_load


def _water_fill(levels: list[int], amount: int) -> list[int]:
    """Split ``amount`` units over bins with starting ``levels`` so the fullest ends lowest;
    ties go to the earlier bin (the owner first)."""
    out = [0] * len(levels)
    cur = list(levels)
    order = sorted(range(len(levels)), key=lambda i: (levels[i], i))
    left = amount
    for j in range(len(order)):  # raise the j+1 lowest bins to the next level
        nxt = cur[order[j + 1]] if j + 1 < len(order) else None
        width = j + 1
        need = (nxt - cur[order[j]]) * width if nxt is not None else left
        step = min(left, need)
        per, extra = divmod(step, width)
        for k, i in enumerate(sorted(order[:width])):
            add = per + (1 if k < extra else 0)
            out[i] += add
            cur[i] += add
        left -= step
        if not left:
            break
    return out


def rank_imbalance(rank_load: list[int]) -> float:
    total = sum(rank_load)
    return max(rank_load) * len(rank_load) / total if total else 0.0
