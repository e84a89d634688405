"""Per-expert routing statistics of one MoE layer, cumulative since start-up.

Counted where routing happens (every rank sees the whole step's routing, so rank 0's numbers
are the model's). Assignments, not tokens: a token routed to k experts counts k times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fleetlm.moe.report import MoEReport, imbalance
from fleetlm.moe.routing import Routing

REPORT_INTERVAL_S = 1.0  # the engine core refreshes its MoE report at most this often


class ExpertStats:
    def __init__(self, num_experts: int, ep_size: int = 1) -> None:
        self.tokens = torch.zeros(num_experts, dtype=torch.int64)
        self.rank_tokens = [0] * ep_size  # assignments computed by each EP rank (after replication)
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
        self.rank_tokens = [0] * len(self.rank_tokens)
        self.dropped = self.rerouted = self.steps = 0


@dataclass(frozen=True)
class LayerExpertStats:
    tokens: tuple[int, ...]  # assignments per expert
    dropped: int
    rerouted: int

    @property
    def imbalance(self) -> float:
        """max / mean of the per-expert load (1.0 = even; 0 when nothing was routed)."""
        return imbalance(self.tokens)


def model_report(model) -> MoEReport | None:
    """The cumulative counts of ``model``'s MoE layers on this rank, or None for a dense model."""
    layers = model.moe_layers() if hasattr(model, "moe_layers") else {}
    if not layers:
        return None
    snaps = {i: m.stats.snapshot() for i, m in sorted(layers.items())}
    replicated = any(m.replication is not None for m in layers.values())
    return MoEReport(layers=tuple(snaps), tokens=tuple(s.tokens for s in snaps.values()),
                     dropped=tuple(s.dropped for s in snaps.values()),
                     rerouted=tuple(s.rerouted for s in snaps.values()),
                     replicas=tuple(m.replication.placement.replicated() if m.replication else ()
                                    for _, m in sorted(layers.items())) if replicated else (),
                     rank_tokens=tuple(tuple(m.stats.rank_tokens) for _, m in sorted(layers.items())))


def executor_report(executor) -> MoEReport | None:
    """Rank 0's MoE report for ``EngineCore.stats``, refreshed at most every ``REPORT_INTERVAL_S``
    (cached on the executor; None at once for a dense model)."""
    cache = getattr(executor, "_moe_report", None)
    now = time.monotonic()
    if cache is not None and (cache[1] is None or now - cache[0] < REPORT_INTERVAL_S):
        return cache[1]
    worker = getattr(executor, "worker", None)
    runner = getattr(worker, "runner", None)
    report = model_report(runner.model) if runner is not None else None
    executor._moe_report = (now, report)
    return report
