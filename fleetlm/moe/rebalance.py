"""``Replicator``: one MoE layer's replica placement, rebalanced while serving.

Every ``rebalance_interval`` forwards of the layer (the same count on every rank: they run the
same steps), the load each expert received since the last rebalance gives a new
``plan_replicas`` placement; the spare slots whose expert changes are filled with the owner's
weights (a broadcast from the owner over the TP group for each, in the same order everywhere),
and routing uses the new placement from that step on. It happens inside a forward, between two
steps' expert computations: no request waits or is dropped, and outputs do not change (a copy
computes exactly what its original does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fleetlm.distributed.communication import _timed
from fleetlm.distributed.parallel_state import get_tp_group
from fleetlm.moe.replication import Placement, owner_placement, plan_replicas


class Replicator:
    def __init__(self, layer) -> None:
        self.layer = layer
        self.placement: Placement = owner_placement(layer.num_experts, layer.group_size, layer.replica_slots)
        self.interval = layer.moe.rebalance_interval
        self.forwards = 0
        self.rebalances = 0
        self._since = torch.zeros(layer.num_experts, dtype=torch.int64)

    def step(self) -> None:
        """Called at the start of every forward of the layer."""
        if torch.is_grad_enabled():
            return
        self.forwards += 1
        if self.interval and self.forwards % self.interval == 0:
            load = self.layer.stats.tokens - self._since
            self._since = self.layer.stats.tokens.clone()
            if int(load.sum()):
                self.apply(plan_replicas(load.tolist(), self.layer.group_size, self.layer.replica_slots))

    def apply(self, new: Placement) -> None:
        """Move to placement ``new``: fill the spare slots whose expert changed."""
        layer, old = self.layer, self.placement
        for rank in range(layer.group_size):
            before, after = old.slot_experts(rank), new.slot_experts(rank)
            for j, (a, b) in enumerate(zip(before, after)):
                if b >= 0 and a != b:
                    self._copy(b, rank, layer.num_local_experts + j)
        self.placement = new
        self.rebalances += 1

    def _copy(self, expert: int, rank: int, slot: int) -> None:
        layer = self.layer
        owner, src = divmod(expert, layer.num_local_experts)
        group = get_tp_group()
        n_slots = layer.num_local_experts + layer.replica_slots
        for p in layer.parameters():
            if p.dim() == 0 or p.shape[0] != n_slots:
                continue
            buf = p.data[src].clone() if layer.group_rank == owner else torch.empty_like(p.data[0])
            _broadcast(buf, dist.get_global_rank(group, owner), group)
            if layer.group_rank == rank:
                p.data[slot].copy_(buf)


@_timed("broadcast")
def _broadcast(buf: torch.Tensor, src: int, group) -> None:
    dist.broadcast(buf, src=src, group=group)
