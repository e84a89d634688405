"""How fast `fleetlm sim` is, and what simulating K of N replicas costs in accuracy.

1. The issue's target: 1 hour of traffic at 3,000 requests/s (100,000 users, one request per
   33.3 s each) over 300 replicas of Llama-3.1-70B on 4 x H100 (roofline profile), least-load
   routing, prompts 1024 +- 50% / outputs 256 +- 50% tokens. Every replica runs the engine's
   scheduler; `--sample-replicas K` simulates K of the 300 (sim/sampling.py).
2. Sampling check: a fleet small enough to simulate whole (32 replicas of Llama-3.1-8B on one
   H100 each, 2 minutes at 15 req/s each) against the same fleet with 4 replicas sampled, for round-robin (exact
   for the sampled replicas) and least-load (approximate) routing.

    python benchmarks/sim_speed.py --out benchmarks/sim_speed.json [--hour-samples 4] [--skip-hour]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEYS = ("p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p90_tpot_ms", "mean_e2el_ms")


def run(profile, replicas: int, router: str, sample: int | None, rate: float, duration: float, seed: int = 0) -> dict:
    from fleetlm.sim import FleetConfig, WorkloadSpec, generate, simulate

    t0, c0 = time.perf_counter(), time.process_time()
    arr = generate(WorkloadSpec("random", rate, None, duration, 1.0, seed, 1024, 256, 0.5))
    t_gen = time.perf_counter() - t0
    res = simulate(profile, FleetConfig(replicas, router, sample_replicas=sample, itl_limit=500_000, seed=seed), arr)
    cpu = time.process_time() - c0
    m = res.metrics
    tokens = m["total_output_tokens"]
    return {"replicas": replicas, "router": router, "sampled": sample or replicas, "rate": rate, "duration_s": duration,
            "arrivals_in_fleet": len(arr), "requests_simulated": res.requests_simulated, "steps": res.steps,
            "output_tokens_simulated": tokens, "wall_s": res.wall_s + t_gen, "cpu_s": cpu, "generate_s": t_gen,
            "us_per_output_token": 1e6 * cpu / max(tokens, 1), "load_avg_1min": os.getloadavg()[0],
            **{k: m[k] for k in KEYS},
            "preemptions": res.scheduler["preemptions"]}


def hour(samples: int) -> dict:
    from fleetlm.sim.roofline_profile import roofline_profile

    prof = roofline_profile("llama-3.1-70b", "h100-sxm", tp=4)
    r = run(prof, 300, "least_load", samples, 100_000 / 33.3, 3600.0)
    full = r["cpu_s"] * 300 / r["sampled"]
    return r | {"full_fleet_estimate_cpu_s": full}


def sampling_check() -> list[dict]:
    from fleetlm.sim.roofline_profile import roofline_profile

    prof = roofline_profile("llama-3.1-8b", "h100-sxm", tp=1)
    out = []
    for router in ("round_robin", "least_load"):
        for sample in (None, 4):
            r = run(prof, 32, router, sample, 32 * 15.0, 120.0, seed=1)
            out.append(r)
            print(json.dumps(r), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/sim_speed.json")
    p.add_argument("--hour-samples", type=int, default=4)
    p.add_argument("--skip-hour", action="store_true")
    p.add_argument("--skip-check", action="store_true")
    args = p.parse_args()
    doc: dict = {"machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    if not args.skip_check:
        doc["sampling_check"] = sampling_check()
    if not args.skip_hour:
        doc["hour"] = hour(args.hour_samples)
        print(json.dumps(doc["hour"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
