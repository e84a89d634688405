"""``fleetlm sim`` against served disaggregated prefill/decode: one prefill worker (CPU 0) and one
decode worker (CPU 1), one thread each, tcp K/V transfer, behind ``fleetlm router --pd``.

    flock /tmp/fleetlm-bench.lock python benchmarks/pd_sim_fidelity.py \
        --profile benchmarks/sim_profile_router_1t.json --out benchmarks/pd_sim_fidelity.json

Workload: ``fleetlm bench serve`` random 512 in / 64 out (fixed lengths, no shared prefix), Poisson,
``--ignore-eos``, at each ``--rates`` (fresh workers for every rate). The simulator runs the same
requests (same lengths, same send times) with ``--replicas 2 --prefill-replicas 1``, the profile
measured on one one-thread replica (``fleetlm profile --num-threads 1 --kv-cache-memory 270MiB``,
pinned to CPU 0; the workers use the same cache size), and the transfer at ``--kv-bandwidth``
(tcp, measured in ``benchmarks/disagg_transfer_quiet.json``: 1.34 GB/s). No serving-path
calibration: the simulated figures are the engine's steps, the scheduler and the transfer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.disagg_interference import pd_pair  # noqa: E402
from benchmarks.sim_fidelity import bench  # noqa: E402
from benchmarks.sim_steplog import arrivals_for  # noqa: E402

FLAGS = ["--dataset-name", "random", "--random-input-len", "512", "--random-output-len", "64",
         "--random-range-ratio", "0"]
KEYS = (("median_ttft_ms", "TTFT p50"), ("p90_ttft_ms", "TTFT p90"), ("median_tpot_ms", "TPOT p50"))


def served(rate: float, seed: int, n: int, kv: str) -> dict:
    with pd_pair(["--num-threads", "1", "--kv-cache-memory", kv, "--max-num-seqs", "64"]) as url:
        with tempfile.TemporaryDirectory() as tmp:  # the P/D router has no /v1/models: name the model
            return bench(url, [*FLAGS, "--model", "smollm2-135m-instruct"], rate, seed, n, Path(tmp) / "bench.json")


def simulated(profile, rate: float, seed: int, n: int, bandwidth: float) -> dict:
    from fleetlm.sim import FleetConfig
    from fleetlm.sim import simulate as run_sim

    cfg = FleetConfig(replicas=2, prefill_replicas=1, kv_bandwidth=bandwidth)
    return run_sim(profile, cfg, arrivals_for(FLAGS, rate, seed, n)).remeasure((50.0, 90.0, 99.0), None)


def main() -> None:
    from fleetlm.sim import load_profile

    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--rates", default="0.5,1.0")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--kv-cache-memory", default="270MiB")
    ap.add_argument("--kv-bandwidth", type=float, default=1.34e9)
    ap.add_argument("--sim-only", action="store_true", help="only the simulated figures (and capacity)")
    ap.add_argument("--out")
    a = ap.parse_args()
    prof = load_profile(a.profile)
    cap = simulated(prof, float("inf"), 0, a.num_prompts, a.kv_bandwidth)["request_throughput"]
    print(f"simulated P/D capacity: {cap:.2f} req/s")
    rows = []
    for i, rate in enumerate(float(r) for r in a.rates.split(",")):
        sim = simulated(prof, rate, 20 + i, a.num_prompts, a.kv_bandwidth)
        row = {"rate": rate, "seed": 20 + i, "sim": {k: sim[k] for k, _ in KEYS}}
        if not a.sim_only:
            m = served(rate, 20 + i, a.num_prompts, a.kv_cache_memory)
            row["served"] = {k: m[k] for k, _ in KEYS}
            row["error"] = {k: sim[k] / m[k] - 1 for k, _ in KEYS}
        rows.append(row)
        print(f"rate {rate}: " + "  ".join(
            f"{label} {row.get('served', {}).get(k, float('nan')):.1f} / {sim[k]:.1f}" for k, label in KEYS))
    if a.out:
        Path(a.out).write_text(json.dumps({"capacity_req_s": cap, "kv_bandwidth": a.kv_bandwidth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
