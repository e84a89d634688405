"""The search loop of ``fleetlm plan --fleet`` (see ``fleet_search`` for the method)."""

from __future__ import annotations

import math
import time
from typing import Any

from fleetlm.plan.errors import PlanError
from fleetlm.plan.fleet_search import (
    LIGHT_LOAD,
    TOLERANCE,
    Candidate,
    FleetPlan,
    FleetWorkload,
    Outcome,
    SearchSpace,
    SimSettings,
    Slo,
    Trial,
    candidates,
)
from fleetlm.plan.prices import gpu_price

OVERLOAD_FACTOR = 3  # stop a trial once a replica holds this many x max_num_seqs requests
COOLDOWN = 0.25  # arrivals go on for this fraction of the measured window after it (not measured)
PRUNE_MARGIN = 0.7  # the pruning bound assumes a replica could do 1 / 0.7 x its capacity estimate


class _Evaluator:
    def __init__(self, model: str, workload: FleetWorkload, slos: tuple[Slo, ...], settings: SimSettings,
                 prices: dict[str, float]) -> None:
        self.model, self.w, self.slos, self.s, self.prices = model, workload, slos, settings, prices
        self.arrivals = workload.arrivals(settings.warmup_s + settings.duration_s * (1 + COOLDOWN), settings.seed)
        self._profiles: dict[tuple, Any] = {}

    def profile(self, c: Candidate):
        key = (c.hardware, c.tp, c.max_num_seqs)
        if key not in self._profiles:
            from fleetlm.sim.roofline_profile import roofline_profile

            s = self.s
            self._profiles[key] = roofline_profile(
                self.model, c.hardware, tp=c.tp, dtype=s.dtype, max_num_seqs=c.max_num_seqs,
                max_num_batched_tokens=s.max_batched_tokens, max_model_len=s.max_model_len,
                memory_utilization=s.memory_utilization, **s.profile_opts)
        return self._profiles[key]

    def cost(self, c: Candidate, replicas: int) -> float:
        return replicas * c.tp * gpu_price(c.hardware, self.prices)

    def trial(self, c: Candidate, replicas: int) -> Trial:
        from fleetlm.plan.hardware import get_hardware
        from fleetlm.sim import FleetConfig, simulate

        prof = self.profile(c)
        prefill = replicas * c.pd[0] // c.unit if c.pd[0] else 0
        hw = get_hardware(c.hardware)
        cfg = FleetConfig(replicas, c.router, prefill, self.s.sample_replicas, hw.network_bw * c.tp, 1e-3,
                          self.s.warmup_s, self.s.warmup_s + self.s.duration_s, itl_limit=200_000,
                          overload_load=OVERLOAD_FACTOR * c.max_num_seqs, seed=self.s.seed)
        res = simulate(prof, cfg, self.arrivals)
        pcts = tuple(sorted({50.0, 90.0, *(slo.percentile for slo in self.slos)}))
        m = res.remeasure(pcts, None)
        values = {k: v for k, v in m.items() if k.endswith("_ms") and k.startswith("p")}
        misses = [f"{slo.metric.upper()} p{slo.percentile:g} {m[slo.key]:,.0f} ms > {slo.ms:g}"
                  for slo in self.slos if m[slo.key] > slo.ms]
        if res.overloaded:
            why = f"overloaded (a replica's queue passed {OVERLOAD_FACTOR} x max_num_seqs)"
        elif m["failed"]:
            why = f"{m['failed']} requests failed: {next(iter(m['errors_summary']))}"
        else:
            why = "; ".join(misses)
        return Trial(replicas, replicas * c.tp, self.cost(c, replicas), values, not why, why, res.wall_s)


def _round_up(n: float, unit: int) -> int:
    return max(unit, math.ceil(n / unit) * unit)


def _min_replicas(ev: _Evaluator, o: Outcome, n0: int, limit: int) -> None:
    """Smallest passing replica count in [n0-ish, limit] for ``o.candidate`` (fills ``o``)."""
    c, unit = o.candidate, o.candidate.unit
    light = min(limit, _round_up(n0 * LIGHT_LOAD, unit))
    t = ev.trial(c, light)
    o.trials.append(t)
    if not t.meets:
        if light >= n0 * LIGHT_LOAD:
            o.reason = f"misses the SLOs even at light load ({light} replicas): {t.why}"
        else:
            o.reason = f"cannot beat the best fleet: misses the SLOs at {light} replicas (the most that costs less): {t.why}"
        return
    lo, hi, best = 0, light, t
    probe = min(n0, hi - unit)
    while probe >= unit:
        t = ev.trial(c, probe)
        o.trials.append(t)
        if not t.meets:
            lo = probe
            break
        hi, best, probe = probe, t, _round_up(probe // 2, unit) if probe > unit else 0
    while hi - lo > max(unit, math.ceil(TOLERANCE * hi)):
        mid = _round_up((lo + hi) / 2, unit)
        if mid >= hi:
            break
        t = ev.trial(c, mid)
        o.trials.append(t)
        lo, hi, best = (lo, mid, t) if t.meets else (mid, hi, best)
    o.best = best


def search_fleet(model: str, workload: FleetWorkload, slos: tuple[Slo, ...], space: SearchSpace,
                 settings: SimSettings, prices: dict[str, float] | None = None, log=None) -> FleetPlan:
    """Visit the candidates cheapest bound first; return every outcome (chosen, failed, pruned)."""
    from fleetlm.plan.model_load import load_model_spec
    from fleetlm.sim.roofline_profile import replica_capacity

    t0 = time.perf_counter()
    ev = _Evaluator(model, workload, slos, settings, prices or {})
    todo: list[tuple[float, int, Outcome]] = []
    outcomes = []
    cands = candidates(load_model_spec(model), space)
    invalid: list[str] = []
    for hw in dict.fromkeys(c.hardware for c in cands):
        gpu_price(hw, ev.prices)  # no price: bad input, before any simulation
    for c in cands:
        o = Outcome(c)
        outcomes.append(o)
        try:
            prof = ev.profile(c)
            price_each = ev.cost(c, 1)
        except PlanError as e:
            o.reason = str(e)
            invalid.append(f"{c.label}: {e}")
            continue
        need = workload.rate / replica_capacity(prof, workload.input_len, workload.output_len)
        n0 = _round_up(need, c.unit)
        o.start = n0
        o.bound_usd = _round_up(need * PRUNE_MARGIN, c.unit) * price_each
        if o.bound_usd > space.max_replicas * price_each:
            o.reason = f"needs at least {n0} replicas by its capacity bound (> --max-replicas {space.max_replicas})"
            continue
        todo.append((o.bound_usd, len(todo), o))
    if cands and len(invalid) == len(cands):
        raise PlanError("the search space is empty: no candidate is a valid layout of "
                        f"{model} ({'; '.join(invalid[:3])}{'; ...' if len(invalid) > 3 else ''})")
    best_usd = math.inf
    for bound, _, o in sorted(todo, key=lambda x: x[:2]):
        if bound >= best_usd:
            o.reason = f"pruned: its optimistic bound ${bound:,.0f}/h is not below the best ${best_usd:,.0f}/h"
            continue
        per = ev.cost(o.candidate, 1)
        limit = min(space.max_replicas, math.floor(best_usd / per - 1e-9) if math.isfinite(best_usd) else space.max_replicas)
        limit -= limit % o.candidate.unit
        n0 = min(o.start, limit)
        _min_replicas(ev, o, n0, limit)
        if o.best is not None:
            best_usd = min(best_usd, o.best.usd_per_hour)
        if log:
            log(f"{o.candidate.label}: {o.best.replicas if o.best else '-'} replicas "
                f"({len(o.trials)} trials, {time.perf_counter() - t0:.0f} s)")
    return FleetPlan(outcomes, slos, workload, settings, time.perf_counter() - t0)
