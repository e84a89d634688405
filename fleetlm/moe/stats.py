"""Per-expert routing statistics of one MoE layer, cumulative since start-up.

Counted where routing happens (every rank sees the whole step's routing, so rank 0's numbers
are the model's). Assignments, not tokens: a token routed to k experts counts k times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fleetlm.moe.routing import Routing


class ExpertStats:
    def __init__(self, num_experts: int) -> None:
        self.tokens = torch.zeros(num_experts, dtype=torch.int64)
        self.dropped = 0
        self.rerouted = 0
        self.steps = 0

    def record(self, routing: Routing) -> None:
        ids = routing.ids.reshape(-1)
        ids = ids[ids >= 0]
        self.tokens += torch.bincount(ids.cpu(), minlength=self.tokens.numel())
        self.dropped += routing.dropped
        self.rerouted += routing.rerouted
        self.steps += 1

    def snapshot(self) -> LayerExpertStats:
        return LayerExpertStats(tuple(int(x) for x in self.tokens.tolist()), self.dropped, self.rerouted)

    def reset(self) -> None:
        self.tokens.zero_()
        self.dropped = self.rerouted = self.steps = 0


@dataclass(frozen=True)
class LayerExpertStats:
    tokens: tuple[int, ...]  # assignments per expert
    dropped: int
    rerouted: int

    @property
    def imbalance(self) -> float:
        """max / mean of the per-expert load (1.0 = even; 0 when nothing was routed)."""
        total = sum(self.tokens)
        return max(self.tokens) * len(self.tokens) / total if total else 0.0
