"""``FusedMoE``: the routed experts of one MoE block.

``forward(x [T, H], router_logits [T, E])``: softmax top-k gating (renormalised as the model
says), the capacity rule when one is set (``fleetlm/moe/routing.py``), then the expert compute:
assignments sorted by expert (one ``argsort``), one gate/up matmul and one down matmul per
expert over its batch of tokens, the weighted results copied back to assignment order and
summed per token.

Layouts over the tensor-parallel group (``tp`` ranks):

- tensor parallel (default): every rank holds all experts, ``1/tp`` of each expert's
  intermediate width; its output is a partial sum (``output_is_partial``), summed by the caller's
  all-reduce together with the shared expert.
- expert parallel (``MoEConfig.expert_parallel``): rank ``r`` holds experts
  ``[r E/tp, (r+1) E/tp)`` whole. Dispatch ``all_to_all``: each rank routes its ``1/tp`` slice of
  the (replicated) tokens to the experts' owners and back, then the slices are all-gathered
  (``fleetlm/moe/dispatch.py``; the output is complete). Dispatch ``all_reduce``: each rank
  computes its experts for every token and the partial sums are reduced like TP. Spare slots
  hold copies of hot experts (``moe_replica_slots``; ``fleetlm/moe/rebalance.py``). Expert
  parallelism is a serving layout: a forward that records gradients under it is refused.

Expert weights are created and applied by an *MoE method* (``UnquantizedMoEMethod``: stacked
``w13_weight [E_local, 2 I, H]`` (gate rows, then up rows) and ``w2_weight [E_local, H, I]``), so
a quantized method can replace it without touching model files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.distributed.parallel_state import parallel_state
from fleetlm.moe.config import MoEConfig
from fleetlm.moe.rebalance import Replicator
from fleetlm.moe.routing import Routing, apply_capacity, topk_gate
from fleetlm.moe.stats import ExpertStats


class MoEMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: FusedMoE, num_experts: int, hidden: int, intermediate: int,
                       dtype: torch.dtype) -> None:
        """Register the layer's expert parameters (``layer.num_local_experts`` of them)."""

    @abstractmethod
    def load(self, layer: FusedMoE, expert: int, kind: str, loaded: torch.Tensor) -> None:
        """Copy this rank's slice of one full checkpoint tensor of local expert ``expert``;
        ``kind`` is ``gate`` / ``up`` ([I, H]) or ``down`` ([H, I])."""

    @abstractmethod
    def apply(self, layer: FusedMoE, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``down(silu(gate(x)) * up(x))`` of local expert ``expert`` over its rows ``x``."""


class UnquantizedMoEMethod(MoEMethod):
    def create_weights(self, layer: FusedMoE, num_experts: int, hidden: int, intermediate: int,
                       dtype: torch.dtype) -> None:
        layer.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, dtype=dtype),
                                        requires_grad=False)
        layer.w2_weight = nn.Parameter(torch.empty(num_experts, hidden, intermediate, dtype=dtype),
                                       requires_grad=False)

    def load(self, layer: FusedMoE, expert: int, kind: str, loaded: torch.Tensor) -> None:
        i, h, full = layer.intermediate_per_rank, layer.hidden_size, layer.intermediate_size
        start = layer.shard_rank * i
        if kind in ("gate", "up"):
            _check(loaded, (full, h), kind)
            dst = layer.w13_weight.data[expert].narrow(0, 0 if kind == "gate" else i, i)
            src = loaded.narrow(0, start, i)
        elif kind == "down":
            _check(loaded, (h, full), kind)
            dst, src = layer.w2_weight.data[expert], loaded.narrow(1, start, i)
        else:
            raise ValueError(f"expert weight kind must be gate, up or down, got {kind!r}")
        with torch.no_grad():
            dst.copy_(src)

    def apply(self, layer: FusedMoE, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, layer.w13_weight[expert])
        n = gate_up.shape[-1] // 2
        return F.linear(F.silu(gate_up[..., :n]) * gate_up[..., n:], layer.w2_weight[expert])


def _check(loaded: torch.Tensor, want: tuple[int, int], kind: str) -> None:
    if tuple(loaded.shape) != want:
        raise ValueError(f"expert {kind} weight has shape {tuple(loaded.shape)}, expected {want}")


class FusedMoE(nn.Module):
    def __init__(self, moe: MoEConfig, hidden_size: int, dtype: torch.dtype, *,
                 method: MoEMethod | None = None) -> None:
        super().__init__()
        st = parallel_state()
        self.moe = moe
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.hidden_size, self.intermediate_size = hidden_size, moe.moe_intermediate_size
        self.expert_parallel = moe.expert_parallel and st.tp_size > 1
        self.group_size, self.group_rank = st.tp_size, st.tp_rank
        if self.expert_parallel:
            if moe.num_experts % st.tp_size:
                raise ValueError(f"expert parallel size {st.tp_size} does not divide the model's "
                                 f"{moe.num_experts} experts")
            self.num_local_experts = moe.num_experts // st.tp_size
            self.first_expert, self.shard_rank, self.intermediate_per_rank = (
                st.tp_rank * self.num_local_experts, 0, moe.moe_intermediate_size)
        else:
            self.num_local_experts, self.first_expert = moe.num_experts, 0
            self.shard_rank, self.intermediate_per_rank = st.tp_rank, moe.moe_intermediate_size // st.tp_size
        self.dispatch = moe.ep_dispatch if self.expert_parallel else "local"
        self.replica_slots = moe.replica_slots if self.dispatch == "all_to_all" else 0
        if moe.replica_slots and not self.replica_slots:
            raise ValueError("moe_replica_slots needs expert parallelism over 2+ ranks with the all_to_all dispatch")
        self.method = method or UnquantizedMoEMethod()
        self.method.create_weights(self, self.num_local_experts + self.replica_slots, hidden_size,
                                   self.intermediate_per_rank, dtype)
        self.stats = ExpertStats(moe.num_experts, self.group_size if self.expert_parallel else 1)
        self.replication = Replicator(self) if self.replica_slots else None
        self.router_logits: torch.Tensor | None = None

    @property
    def output_is_partial(self) -> bool:
        """Whether ``forward`` returns this rank's share, to be summed over the TP group."""
        return self.group_size > 1 and self.dispatch != "all_to_all"

    def is_local(self, expert: int) -> bool:
        return self.first_expert <= expert < self.first_expert + self.num_local_experts

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str]) -> None:
        """``shard_id = (global expert id, gate | up | down)``; experts of other EP ranks are skipped."""
        expert, kind = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range: the model has {self.num_experts} experts")
        if self.is_local(expert):
            self.method.load(self, expert - self.first_expert, kind, loaded)

    def route(self, router_logits: torch.Tensor) -> Routing:
        routing, probs = topk_gate(router_logits, self.top_k, self.moe.norm_topk_prob)
        if self.moe.capacity_factor is not None:
            routing = apply_capacity(routing, probs, self.moe.capacity_factor, self.moe.overflow_policy)
        if torch.is_grad_enabled() and router_logits.requires_grad:
            self.router_logits = router_logits  # for the training losses (fleetlm/moe/losses.py)
        else:
            self.stats.record(routing)
        return routing

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self.expert_parallel and torch.is_grad_enabled() and (x.requires_grad or router_logits.requires_grad):
            raise ValueError("expert parallelism is a serving layout: its dispatch records no gradients "
                             "(train MoE models with tensor or data parallelism)")
        if self.replication is not None:
            self.replication.step()
        routing = self.route(router_logits)
        if self.dispatch == "all_to_all":
            from fleetlm.moe.dispatch import all_to_all_experts

            return all_to_all_experts(self, x, routing)
        return self.grouped(x, routing.ids, routing.weights)

    def grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum over each token's local experts: ``ids`` [N, k] global ids (others and -1
        are skipped)."""
        local = ids - self.first_expert
        local = torch.where((local >= 0) & (local < self.num_local_experts), local, -1)
        return self.grouped_slots(x, local, weights)

    def grouped_slots(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum over local expert slots: ``slots`` [N, k] (-1 skipped). Assignments are
        sorted by slot; one matmul pair per slot's batch of rows; the weighted results go back
        to assignment order in one copy and each token sums its k of them."""
        n_slots, k = self.num_local_experts + self.replica_slots, slots.shape[1]
        local = torch.where(slots >= 0, slots, n_slots).reshape(-1)
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=n_slots + 1)[:n_slots].tolist()
        n_valid = sum(counts)
        if n_valid == 0:
            return torch.zeros_like(x)
        order = order[:n_valid]
        rows = x[order // k]
        parts, start = [], 0
        for expert, n in enumerate(counts):
            if n:
                parts.append(self.method.apply(self, expert, rows[start : start + n]))
                start += n
        y = (parts[0] if len(parts) == 1 else torch.cat(parts)) * weights.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
        out = x.new_zeros((slots.numel(), x.shape[-1])).index_copy(0, order, y)
        return out.view(*slots.shape, -1).sum(1)
