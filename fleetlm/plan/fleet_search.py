"""``fleetlm plan --fleet``: the cheapest fleet that meets latency SLOs, found by simulation.

Each candidate (GPU type, TP, router policy, P/D split, max batch) gets a roofline profile
(``fleetlm.sim.roofline_profile``); its replica count is then searched with the fleet simulator
(``fleetlm.sim``), which runs the engine's scheduler on a sampled sub-fleet
(``sim/sampling.py``), so one evaluation costs the same whatever the fleet size:

1. start from ``n0``, the replicas an optimistic capacity bound needs (``replica_capacity``);
2. check the SLOs at light load (8 x ``n0``; capped by the best cost so far): a candidate that
   misses them there misses them at any size (its latency floor is too high), or is pruned;
3. bisect between a failing and a passing count, to within 3% (P/D: whole units of p + d).

Candidates are visited cheapest bound first; one whose optimistic cost is no lower than the
best fleet found so far is pruned without simulation. Cost = GPUs x the hourly price per GPU
(``plan/prices.py``). Monotonicity in the replica count is assumed (more replicas, lower load),
and seeds are fixed, so every evaluation of a candidate sees the same arrivals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import product
from typing import Any

from fleetlm.plan.errors import PlanError

SLO_METRICS = ("ttft", "tpot", "itl", "e2el")
LIGHT_LOAD = 8.0
TOLERANCE = 0.03


@dataclass(frozen=True)
class Slo:
    metric: str
    percentile: float
    ms: float

    @property
    def key(self) -> str:
        from fleetlm.bench.serve_metrics import pct_label

        return f"p{pct_label(self.percentile)}_{self.metric}_ms"

    def __str__(self) -> str:
        return f"{self.metric.upper()} p{self.percentile:g} <= {self.ms:g} ms"


def parse_slos(items: list[str] | None, percentile: float = 90.0) -> tuple[Slo, ...]:
    """``["ttft:500", "p99_tpot:60"]``: NAME:MS at ``percentile``, or pNN_NAME:MS."""
    if not items:
        raise PlanError("--fleet needs at least one --slo, e.g. --slo ttft:1000 tpot:50")
    out = []
    for item in items:
        name, sep, value = item.partition(":")
        pct, _, metric = name.strip().lower().rpartition("_")
        try:
            p = float(pct[1:]) if pct else percentile
            ms = float(value)
        except ValueError:
            p = ms = float("nan")
        if not sep or metric not in SLO_METRICS or (pct and not pct.startswith("p")) \
                or not 0 < p <= 100 or not (math.isfinite(ms) and ms > 0):
            raise PlanError(f"--slo {item!r} cannot be parsed: use NAME:MS or pNN_NAME:MS with NAME one of "
                            f"{', '.join(SLO_METRICS)}, 0 < NN <= 100 and MS > 0 (e.g. ttft:1000, p99_tpot:60)")
        out.append(Slo(metric, p, ms))
    return tuple(out)


@dataclass(frozen=True)
class FleetWorkload:
    rate: float
    input_len: int
    output_len: int
    range_ratio: float = 0.0
    burstiness: float = 1.0

    def arrivals(self, duration: float, seed: int):
        from fleetlm.sim.workload import WorkloadSpec, generate

        return generate(WorkloadSpec("random", self.rate, None, duration, self.burstiness, seed, self.input_len,
                                     self.output_len, self.range_ratio))


@dataclass(frozen=True)
class Candidate:
    hardware: str
    tp: int
    router: str
    pd: tuple[int, int]  # (0, 0): no split
    max_num_seqs: int

    @property
    def unit(self) -> int:
        return sum(self.pd) or 1

    @property
    def label(self) -> str:
        pd = f"P/D {self.pd[0]}:{self.pd[1]}" if self.pd[0] else "no P/D"
        return f"{self.hardware} TP{self.tp} {pd} {self.router} max_seqs {self.max_num_seqs}"


@dataclass(frozen=True)
class SearchSpace:
    hardware: tuple[str, ...]
    tp: tuple[int, ...] | None = None  # None: every TP inside a node that splits the heads
    routers: tuple[str, ...] = ("least_load",)
    pd: tuple[tuple[int, int], ...] = ((0, 0),)
    max_num_seqs: tuple[int, ...] = (256,)
    max_replicas: int = 4096


@dataclass(frozen=True)
class SimSettings:
    duration_s: float = 30.0
    warmup_s: float = 10.0
    sample_replicas: int = 2
    seed: int = 0
    dtype: str = "bf16"
    max_model_len: int = 8192
    max_batched_tokens: int = 8192
    memory_utilization: float = 0.9
    profile_opts: dict[str, float] = field(default_factory=dict)  # mfu, mbu, overhead_s


@dataclass(frozen=True)
class Trial:
    replicas: int
    gpus: int
    usd_per_hour: float
    values: dict[str, float]
    meets: bool
    why: str
    wall_s: float


@dataclass
class Outcome:
    candidate: Candidate
    reason: str = ""
    best: Trial | None = None
    trials: list[Trial] = field(default_factory=list)
    bound_usd: float = math.inf  # optimistic: no fleet of this candidate costs less
    start: int = 1  # replicas by the capacity estimate, where the search starts


@dataclass
class FleetPlan:
    outcomes: list[Outcome]
    slos: tuple[Slo, ...]
    workload: FleetWorkload
    settings: SimSettings
    search_s: float

    @property
    def best(self) -> Outcome | None:
        ok = [o for o in self.outcomes if o.best is not None]
        return min(ok, key=lambda o: o.best.usd_per_hour) if ok else None  # type: ignore[union-attr]

    @property
    def evaluations(self) -> int:
        return sum(len(o.trials) for o in self.outcomes)


def candidates(model: Any, space: SearchSpace) -> list[Candidate]:
    from fleetlm.plan.hardware import get_hardware
    from fleetlm.plan.parallel import tp_candidates

    out = []
    for hw in space.hardware:
        node = get_hardware(hw).devices_per_node
        tps = space.tp or tuple(t for t in tp_candidates(model, node) if t & (t - 1) == 0)
        for tp, router, pd, seqs in product(tps, space.routers, space.pd, space.max_num_seqs):
            out.append(Candidate(get_hardware(hw).name, tp, router, pd, seqs))
    if not out:
        raise PlanError("the search space is empty: give at least one hardware, TP, router, P/D split and batch size")
    return out
