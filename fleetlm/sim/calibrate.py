"""Calibrate a profile's serving path against one run of a live server.

A measured profile times ``EngineCore.step`` alone. Served on a CPU machine, the server's front
end (HTTP, detokenization, SSE) and the load client run on the same cores as the engine, and a
request crosses processes on its way in and its first token on the way out. Two numbers model
that (``Profile.serve_per_token_s``, ``Profile.frontend_s``):

1. ``serve_per_token_s``: the per-streamed-token time that makes the simulated median TPOT equal
   the measured one (bisection; TPOT grows with it);
2. ``frontend_s``: then the measured median TTFT minus the simulated one (at least 0).

Calibrate on one run and predict others: the calibration run should not be one of the runs the
profile is then checked against (``benchmarks/sim_fidelity.py`` keeps them apart).
"""

from __future__ import annotations

from dataclasses import replace

from fleetlm.sim.fleet import FleetConfig, FleetSim
from fleetlm.sim.profile import Profile
from fleetlm.sim.workload import Arrivals


def _sim(profile: Profile, arrivals: Arrivals) -> dict:
    return FleetSim(profile, FleetConfig(), arrivals).run().metrics


def calibrate_serving(profile: Profile, arrivals: Arrivals, measured: dict, max_per_token_s: float = 0.02,
                      iterations: int = 30) -> Profile:
    """``profile`` with ``serve_per_token_s`` and ``frontend_s`` fitted to ``measured`` (the
    metrics of a ``fleetlm bench serve`` run of ``arrivals``: ``median_tpot_ms``, ``median_ttft_ms``)."""
    target = measured["median_tpot_ms"]
    lo, hi = 0.0, max_per_token_s
    base = replace(profile, frontend_s=0.0, serve_per_token_s=0.0)
    if _sim(base, arrivals)["median_tpot_ms"] >= target:
        hi = 0.0
    for _ in range(iterations if hi else 0):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sim(replace(base, serve_per_token_s=mid), arrivals)["median_tpot_ms"] < target else (lo, mid)
    tuned = replace(base, serve_per_token_s=hi)
    offset = measured["median_ttft_ms"] - _sim(tuned, arrivals)["median_ttft_ms"]
    return replace(tuned, frontend_s=max(0.0, offset) / 1e3)
