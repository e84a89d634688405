"""Fidelity of `fleetlm sim`: the same workloads through `fleetlm serve` (measured by `fleetlm
bench serve`) and through the simulator fed with the profile measured on this machine.

Scenarios (64 prompts each, Poisson arrivals, greedy, ignore_eos, a fresh seed per scenario so
no run hits another's prefix cache):
- random 256 prompt / 128 output tokens at three rates: light (25% of the capacity the profile
  predicts), near saturation (85%) and overloaded (150%);
- shared prefix: 4 groups of a 512-token prefix + 64 own tokens, 64 output tokens, at the
  light rate of that workload.
The simulator gets the same flags and seed, so the same lengths and send times
(`fleetlm/bench/serve_datasets.py`).

    python benchmarks/sim_fidelity.py --out benchmarks/sim_fidelity.json        # profile + serve + compare
    python benchmarks/sim_fidelity.py --out ... --profile benchmarks/sim_profile_cpu.json   # reuse a profile
    python benchmarks/sim_fidelity.py --compare-only benchmarks/sim_fidelity.json           # re-simulate only

Before each timed phase the script waits (up to --max-wait s) for the 1-minute load average
to fall under --max-load, and records the load it started at.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve import wait_ready  # noqa: E402

METRICS = ("p50_ttft_ms", "p90_ttft_ms", "p50_tpot_ms")


def scenarios(capacity: float, prefix_capacity: float) -> list[dict]:
    base = ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128"]
    sp = ["--dataset-name", "shared-prefix", "--shared-prefix-len", "512", "--suffix-len", "64",
          "--num-prefixes", "4", "--random-output-len", "64"]
    return [
        {"name": "random 256/128, light", "flags": base, "rate": round(0.25 * capacity, 2), "seed": 11},
        {"name": "random 256/128, near saturation", "flags": base, "rate": round(0.85 * capacity, 2), "seed": 12},
        {"name": "random 256/128, overloaded", "flags": base, "rate": round(1.5 * capacity, 2), "seed": 13},
        {"name": "shared prefix 4 x 512 + 64 / 64, light", "flags": sp, "rate": round(0.25 * prefix_capacity, 2),
         "seed": 14},
    ]


def load1() -> float:
    return os.getloadavg()[0]


def wait_quiet(max_load: float, max_wait: float) -> float:
    t0 = time.monotonic()
    while load1() > max_load and time.monotonic() - t0 < max_wait:
        time.sleep(10)
    return load1()


def sim_args(flags: list[str], rate: float, seed: int, n: int) -> list[str]:
    return [*flags, "--request-rate", str(rate), "--seed", str(seed), "--num-prompts", str(n)]


def simulate(profile: str, flags: list[str], rate: float, seed: int, n: int) -> dict:
    from fleetlm.entrypoints.cli import build_parser
    from fleetlm.sim import FleetConfig, load_profile
    from fleetlm.sim import simulate as run_sim
    from fleetlm.sim.cli import workload_from_args

    args = build_parser().parse_args(["sim", "--profile", profile, *sim_args(flags, rate, seed, n)])
    res = run_sim(load_profile(profile), FleetConfig(), workload_from_args(args))
    return res.remeasure((50.0, 90.0, 99.0), None)


def capacity(profile: str, flags: list[str], n: int) -> float:
    """Requests/s the simulated replica sustains when all ``n`` arrive at once."""
    m = simulate(profile, flags, float("inf"), 0, n)
    return m["request_throughput"]


def bench(url: str, flags: list[str], rate: float, seed: int, n: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "fleetlm.entrypoints.cli", "bench", "serve", "--base-url", url,
           *sim_args(flags, rate, seed, n), "--ignore-eos", "--disable-tqdm", "--metric-percentiles", "50,90,99",
           "--save-result", str(out)]
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def serve_all(args: argparse.Namespace, scen: list[dict]) -> list[dict]:
    url = f"http://127.0.0.1:{args.port}"
    cmd = f"{shlex.quote(sys.executable)} -m fleetlm.entrypoints.cli serve --port {args.port}"
    log = Path(tempfile.gettempdir()) / f"sim_fidelity_serve_{os.getpid()}.log"
    print(f"$ {cmd}", flush=True)
    proc = subprocess.Popen(["bash", "-c", cmd], stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, proc)
        for s in scen:
            s["load_before"] = wait_quiet(args.max_load, args.max_wait)
            out = Path(tempfile.gettempdir()) / f"sim_fidelity_{s['seed']}.json"
            m = bench(url, s["flags"], s["rate"], s["seed"], args.num_prompts, out)
            s["measured"] = {k: m[k] for k in (*METRICS, "p99_ttft_ms", "mean_ttft_ms", "mean_tpot_ms",
                                               "request_throughput", "completed")}
            print(f"{s['name']}: measured {json.dumps(s['measured'])}", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
    return scen


def compare(profile: str, scen: list[dict], n: int) -> None:
    for s in scen:
        sim = simulate(profile, s["flags"], s["rate"], s["seed"], n)
        s["simulated"] = {k: sim[k] for k in (*METRICS, "p99_ttft_ms", "mean_ttft_ms", "mean_tpot_ms",
                                              "request_throughput", "completed")}
        s["error"] = {k: (s["simulated"][k] - s["measured"][k]) / s["measured"][k] for k in METRICS}


def table(scen: list[dict]) -> str:
    rows = ["| scenario | rate req/s | " + " | ".join(f"{k} measured / simulated (error)" for k in METRICS) + " |",
            "|---|---|" + "---|" * len(METRICS)]
    for s in scen:
        cells = [f"{s['measured'][k]:,.0f} / {s['simulated'][k]:,.0f} ({s['error'][k]:+.1%})" for k in METRICS]
        rows.append(f"| {s['name']} | {s['rate']:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/sim_fidelity.json")
    p.add_argument("--profile", help="profile JSON (default: measure one into benchmarks/sim_profile_cpu.json)")
    p.add_argument("--compare-only", help="results JSON of an earlier run: re-simulate, do not serve")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--max-load", type=float, default=0.5)
    p.add_argument("--max-wait", type=float, default=600.0)
    args = p.parse_args()
    if args.compare_only:
        doc = json.loads(Path(args.compare_only).read_text())
        profile, scen = args.profile or doc["profile"], doc["scenarios"]
    else:
        profile = args.profile or str(ROOT / "benchmarks" / "sim_profile_cpu.json")
        if not args.profile:
            load = wait_quiet(args.max_load, args.max_wait)
            print(f"measuring the profile (load {load:.2f})", flush=True)
            subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", "profile", "--out", profile], check=True)
        rnd = ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128"]
        sp = ["--dataset-name", "shared-prefix", "--shared-prefix-len", "512", "--suffix-len", "64",
              "--num-prefixes", "4", "--random-output-len", "64"]
        scen = serve_all(args, scenarios(capacity(profile, rnd, args.num_prompts), capacity(profile, sp, args.num_prompts)))
    compare(profile, scen, args.num_prompts)
    doc = {"profile": profile, "num_prompts": args.num_prompts, "machine": platform.processor() or platform.machine(),
           "scenarios": scen}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(table(scen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
