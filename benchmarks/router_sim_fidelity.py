"""``fleetlm sim`` against ``fleetlm router`` over 2 replicas: the shared-prefix workload of
``benchmarks/router_prefix.py`` (same requests, same send times), per routing policy.

    python benchmarks/router_sim_fidelity.py --profile benchmarks/sim_profile_router_1t.json \
        --measured benchmarks/router_prefix_sim_fidelity.json --out benchmarks/router_sim_fidelity.json

The profile is measured on one replica as the runs serve it (``fleetlm profile --num-threads 1
--kv-cache-memory 270MiB``, pinned to CPU 0). The serving path (front end, per streamed token;
``fleetlm/sim/calibrate.py``) is fitted on the one-replica run (``single_540MiB``) only, then the
2-replica runs are predicted: TTFT p50/p90 and TPOT p50, simulated vs measured. The simulator's
``prefix`` router is approximate (it remembers where each prefix group went); it is compared
with both of the real router's prefix modes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.router_prefix import write_trace  # noqa: E402

SIM_POLICY = {"round_robin": "round_robin", "least_load": "least_load", "prefix-approximate": "prefix",
              "prefix-precise": "prefix"}
KEYS = (("ttft_p50_ms", "median_ttft_ms"), ("ttft_p90_ms", "p90_ttft_ms"), ("tpot_p50_ms", "median_tpot_ms"))


def simulate(profile, arrivals, replicas: int, policy: str) -> dict:
    from fleetlm.sim.fleet import FleetConfig, FleetSim

    return FleetSim(profile, FleetConfig(replicas=replicas, router=policy), arrivals).run().metrics


def main() -> None:
    from fleetlm.sim.calibrate import calibrate_serving
    from fleetlm.sim.profile import load_profile
    from fleetlm.sim.workload import load_trace

    p = argparse.ArgumentParser()
    p.add_argument("--profile", required=True)
    p.add_argument("--measured", required=True)
    p.add_argument("--rate", type=float, default=1.4)
    p.add_argument("--num-blocks", type=int, default=768, help="KV blocks per 2-replica replica (270 MiB)")
    p.add_argument("--single-num-blocks", type=int, default=1536, help="KV blocks of the one-replica run (540 MiB)")
    p.add_argument("--out")
    a = p.parse_args()
    trace = Path(a.measured).with_suffix(".trace.jsonl")
    write_trace(str(trace), argparse.Namespace(seed=0, groups=16, per_group=8, prefix=1024, question=64,
                                                max_tokens=64, rate=a.rate))
    arrivals = load_trace(trace)
    measured = json.loads(Path(a.measured).read_text())
    prof = load_profile(a.profile)
    single = measured["single_540MiB"]
    one = prof.with_engine(num_blocks=a.single_num_blocks)
    tuned = calibrate_serving(one, arrivals, {"median_tpot_ms": single["tpot_p50_ms"],
                                              "median_ttft_ms": single["ttft_p50_ms"]})
    out = {"calibration": {"run": "single_540MiB", "serve_per_token_s": tuned.serve_per_token_s,
                           "frontend_s": tuned.frontend_s}, "rows": {}}
    two = tuned.with_engine(num_blocks=a.num_blocks)
    for label, run in measured.items():
        if label == "single_540MiB":
            continue
        sim = simulate(two, arrivals, 2, SIM_POLICY[label])
        raw = simulate(replace(two, serve_per_token_s=0.0, frontend_s=0.0), arrivals, 2, SIM_POLICY[label])
        row = {}
        for mk, sk in KEYS:
            row[mk] = {"measured": run[mk], "sim": sim[sk], "error": sim[sk] / run[mk] - 1, "sim_engine_only": raw[sk]}
        out["rows"][label] = row
        print(f"{label:20s} " + "  ".join(f"{mk} {run[mk]:7.1f} / {sim[sk]:7.1f} ({sim[sk] / run[mk] - 1:+.1%})"
                                           for mk, sk in KEYS))
    sim1 = simulate(tuned, arrivals, 1, "round_robin")
    out["calibration"]["one_replica"] = {mk: {"measured": single[mk], "sim": sim1[sk]} for mk, sk in KEYS}
    print("one replica (calibration run)  " + "  ".join(f"{mk} {single[mk]:7.1f} / {sim1[sk]:7.1f}" for mk, sk in KEYS))
    print(f"calibrated on the one-replica run: serve_per_token {tuned.serve_per_token_s * 1e3:.2f} ms, "
          f"front end {tuned.frontend_s * 1e3:.1f} ms")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
