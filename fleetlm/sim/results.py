"""What the simulator measures: per-request token times (as ``fleetlm bench serve`` sees them)
and the fleet's utilisation and queues over time.

Latencies are turned into ``fleetlm.bench.serve_metrics.RequestResult`` objects and aggregated
by its ``calculate_metrics``: the same definitions (TTFT, TPOT, ITL, E2EL, goodput) as the
load client. ``frontend_s`` of the profile (request in + token out between a client and the
engine core) is added to TTFT and E2EL. ITLs are kept for every request while the expected
total stays under ``itl_limit`` gaps; above it, for every k-th request only (the pooled ITL
statistics are then those of the subset).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleetlm.sim.fleet import FleetSim
    from fleetlm.sim.sampling import SubFleet
    from fleetlm.sim.workload import Arrivals


class Recorder:
    def __init__(self, arr: Arrivals, warmup_s: float, frontend_s: float, itl_limit: int,
                 measure_end_s: float | None = None) -> None:
        n = len(arr)
        self.arr, self.warmup_s, self.frontend_s = arr, warmup_s, frontend_s
        self.measure_end_s = math.inf if measure_end_s is None else measure_end_s
        self.first = [-1.0] * n
        self.last = [-1.0] * n
        self.ntok = [0] * n
        self.end = [-1.0] * n
        self.prompt_len = [0] * n
        self.errors: dict[int, str] = {}
        gaps = int(arr.output_len.sum()) if n else 0
        self.itl_every = max(1, math.ceil(gaps / itl_limit)) if itl_limit > 0 else 0
        self.itl: dict[int, list[float]] = {}
        self.arrived = 0
        self.completed = 0

    def token(self, i: int, t: float) -> None:
        if self.ntok[i] == 0:
            self.first[i] = t
        elif self.itl_every and i % self.itl_every == 0:
            self.itl.setdefault(i, []).append(t - self.last[i])
        self.last[i] = t
        self.ntok[i] += 1

    def done(self, i: int, t: float) -> None:
        self.end[i] = t
        self.completed += 1

    def fail(self, i: int, why: str) -> None:
        self.errors[i] = why

    def results(self) -> tuple[list[Any], float]:
        """``RequestResult`` per measured request, and the duration (first measured arrival to
        last completion), as the load client defines them."""
        from fleetlm.bench.serve_metrics import RequestResult

        t = self.arr.t.tolist()
        fe, out = self.frontend_s, []
        t0, t_end = math.inf, -math.inf
        for i, ta in enumerate(t):
            if ta < self.warmup_s or ta >= self.measure_end_s:
                continue
            t0 = min(t0, ta)
            r = RequestResult(prompt_len=self.prompt_len[i], start_time=1.0 + ta)
            if self.end[i] >= 0:
                r.success, r.output_tokens, r.output_len_source = True, self.ntok[i], "sim"
                r.ttft, r.latency = self.first[i] - ta + fe, self.end[i] - ta + fe
                r.itl = self.itl.get(i, [])
                t_end = max(t_end, self.end[i] + fe)
            else:
                r.error = self.errors.get(i, "not finished when the simulation stopped")
            out.append(r)
        return out, (t_end - t0) if out and t_end > t0 else 0.0


class Timeline:
    """Per pool, at every tick: mean utilisation over the interval (busy fraction of the
    simulated replicas), mean running / waiting requests and KV usage per replica, the fleet's
    queue (waiting x the pool's replicas), and arrivals / completions per second for the fleet."""

    def __init__(self, pools: dict[str, list], interval: float, sf: SubFleet) -> None:
        self.pools, self.interval, self.sf = pools, interval, sf
        self.rows: list[dict[str, float]] = []
        self._busy = {name: 0.0 for name in pools}
        self._seen_done = 0
        self._seen_arr = 0

    def tick(self, t: float, arrived: int, completed: int) -> None:
        f = self.sf.fraction
        row: dict[str, float] = {
            "t_s": round(t, 6),
            "arrivals_per_s": (arrived - self._seen_arr) / self.interval / f,
            "completions_per_s": (completed - self._seen_done) / self.interval / f,
        }
        self._seen_done, self._seen_arr = completed, arrived
        for name, reps in self.pools.items():
            total = self.sf.prefill_total if name == "prefill" else self.sf.decode_total
            busy = sum(r.busy_time(t) for r in reps)
            stats = [r.scheduler.stats() for r in reps]
            k = len(reps)
            waiting = sum(s.num_waiting for s in stats) / k
            row[f"{name}_utilisation"] = (busy - self._busy[name]) / (self.interval * k)
            row[f"{name}_running"] = sum(s.num_running for s in stats) / k
            row[f"{name}_waiting"] = waiting
            row[f"{name}_queue_fleet"] = waiting * total
            row[f"{name}_kv_usage"] = sum(s.kv_cache_usage for s in stats) / k
            self._busy[name] = busy
        self.rows.append(row)

    def write_csv(self, path: str | Path) -> Path:
        p = Path(path)
        with p.open("w", newline="") as f:
            if self.rows:
                w = csv.DictWriter(f, fieldnames=list(self.rows[0]))
                w.writeheader()
                w.writerows(self.rows)
        return p


@dataclass
class SimResult:
    metrics: dict[str, Any]
    results: list[Any]
    timeline: Timeline
    simulated_replicas: dict[str, int]
    fleet_replicas: dict[str, int]
    fraction: float
    requests_simulated: int
    steps: int
    wall_s: float
    overloaded: bool
    scheduler: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, sim: FleetSim, wall_s: float, percentiles: tuple[float, ...] = (50, 90, 99),
              slos: dict[str, float] | None = None) -> SimResult:
        from fleetlm.bench.serve_metrics import calculate_metrics

        results, duration = sim.rec.results()
        metrics = calculate_metrics(results, duration, percentiles=list(percentiles), goodput_slos=slos)
        reps = sim.front + sim.back
        sched: dict[str, int] = {"preemptions": 0, "prefix_queries": 0, "prefix_hits": 0}
        for r in reps:
            s = r.scheduler.stats()
            sched["preemptions"] += s.num_preemptions
            sched["prefix_queries"] += s.prefix_queries
            sched["prefix_hits"] += s.prefix_hits
        sf = sim.sf
        sim_reps = {"prefill": sf.prefill, "decode": sf.decode} if sf.prefill else {"all": sf.decode}
        fleet = {"prefill": sf.prefill_total, "decode": sf.decode_total} if sf.prefill else {"all": sf.decode_total}
        return cls(metrics, results, sim.timeline, sim_reps, fleet, sf.fraction, len(sim.arr),
                   sum(r.num_steps for r in reps), wall_s, sim.overloaded, sched)

    def remeasure(self, percentiles: tuple[float, ...], slos: dict[str, float] | None) -> dict[str, Any]:
        """Metrics again with other percentiles or SLOs (same requests)."""
        from fleetlm.bench.serve_metrics import calculate_metrics

        return calculate_metrics(self.results, self.metrics["duration"], percentiles=list(percentiles),
                                 goodput_slos=slos)
