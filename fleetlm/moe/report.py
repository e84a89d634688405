"""``MoEReport``: the per-expert routing counts the engine core sends with its stats (plain
data, no torch: it crosses the core -> front-end socket inside ``SchedulerStats``).

Counts are cumulative since start-up (a lost report loses nothing) and count assignments: a
token routed to k experts counts k times. ``layers`` are block indices of this report's MoE
layers (rank 0's pipeline stage).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEReport:
    layers: tuple[int, ...]
    tokens: tuple[tuple[int, ...], ...]  # [layer][expert] assignments
    dropped: tuple[int, ...]  # per layer, over capacity and not placed
    rerouted: tuple[int, ...]  # per layer, moved to a next-best expert
    replicas: tuple[tuple[int, ...], ...] = ()  # [layer] experts holding a redundant copy (if any)
    rank_tokens: tuple[tuple[int, ...], ...] = ()  # [layer][EP rank] assignments computed there

    def __add__(self, other: MoEReport) -> MoEReport:
        """Counts of two engine cores (data parallelism: ``sum`` of their reports)."""
        if self.layers != other.layers:
            raise ValueError(f"MoE reports of different layers: {self.layers} vs {other.layers}")
        return MoEReport(self.layers, tuple(tuple(a + b for a, b in zip(x, y)) for x, y in zip(self.tokens, other.tokens)),
                         tuple(a + b for a, b in zip(self.dropped, other.dropped)),
                         tuple(a + b for a, b in zip(self.rerouted, other.rerouted)), self.replicas,
                         tuple(tuple(a + b for a, b in zip(x, y)) for x, y in zip(self.rank_tokens, other.rank_tokens)))

    def __radd__(self, other: object) -> MoEReport:
        if other == 0:  # sum() starts from 0
            return self
        return NotImplemented


def imbalance(tokens: tuple[int, ...] | list[int]) -> float:
    """max / mean of per-expert load; 1.0 is perfectly even, 0.0 when nothing was routed."""
    total = sum(tokens)
    return max(tokens) * len(tokens) / total if total else 0.0
