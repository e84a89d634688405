"""Shared types of the parallelism planner: forced degrees, the plan, and its context."""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm.plan.formats import WeightFormat
from fleetlm.plan.hardware import HardwareSpec
from fleetlm.plan.memory import MemoryPlan, memory_plan
from fleetlm.plan.model_spec import ModelSpec
from fleetlm.plan.workload import Layout, Workload


@dataclass(frozen=True)
class Forced:
    """Degrees the user fixed on the command line (None: the planner chooses)."""

    tp: int | None = None
    pp: int | None = None
    ep: int | None = None
    dp: int | None = None
    cp: int | None = None


@dataclass(frozen=True)
class ParallelPlan:
    """The chosen layout, its memory, one reason per decision, and the prefill/decode split."""

    layout: Layout
    memory: MemoryPlan
    reasons: tuple[str, ...]
    disaggregate: bool = False
    prefill_replicas: int = 0
    decode_replicas: int = 0


@dataclass(frozen=True)
class PlanContext:
    """What stays fixed while layouts are compared. ``ok``: fits and holds the concurrency."""

    m: ModelSpec
    fmt: WeightFormat | None
    hw: HardwareSpec
    w: Workload
    gpus: int

    def mem(self, lay: Layout) -> MemoryPlan:
        return memory_plan(self.m, self.fmt, self.hw, lay, self.w)

    def ok(self, lay: Layout) -> bool:
        mp = self.mem(lay)
        return mp.fits and mp.max_concurrent_seqs >= self.w.concurrency
