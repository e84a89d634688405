"""Fidelity of `fleetlm sim`: the same workloads through `fleetlm serve` (measured by `fleetlm
bench serve`) and through the simulator fed with the profile measured on this machine.

Scenarios (64 prompts each, Poisson arrivals, greedy, ignore_eos, a fresh seed per scenario so
no run hits another's prefix cache):
- random 256 prompt / 128 output tokens at three rates: light (25% of the capacity the profile
  predicts), near saturation (85%) and overloaded (150%);
- shared prefix: 4 groups of a 512-token prefix + 64 own tokens, 64 output tokens, at the
  light rate of that workload.
The simulator gets the same flags and seed, so the same lengths and send times
(`fleetlm/bench/serve_datasets.py`). It runs twice: with the engine profile as measured, and
with that profile's serving path calibrated (`fleetlm/sim/calibrate.py`) on a separate
calibration run (random 256/128 at 50% of capacity, 32 prompts, its own seed). A third column separates the simulator's own error from
the server's: the same requests (same token ids, same send times) replayed in-process into an
`EngineCore` in real time (add what has arrived, step, record token times: no HTTP, no
detokenization, no other process).

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


def scenarios(capacity: float, prefix_capacity: float, repeats: int) -> list[dict]:
    """Each scenario ``repeats`` times with its own seed (seed + 100 r): the spread between
    repeats is the noise of the machine and of the workload draw."""
    base = ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128"]
    sp = ["--dataset-name", "shared-prefix", "--shared-prefix-len", "512", "--suffix-len", "64",
          "--num-prefixes", "4", "--random-output-len", "64"]
    one = [
        {"name": "random 256/128, light", "flags": base, "rate": round(0.25 * capacity, 2), "seed": 11},
        {"name": "random 256/128, near saturation", "flags": base, "rate": round(0.85 * capacity, 2), "seed": 12},
        {"name": "random 256/128, overloaded", "flags": base, "rate": round(1.5 * capacity, 2), "seed": 13},
        {"name": "shared prefix 4 x 512 + 64 / 64, light", "flags": sp, "rate": round(0.25 * prefix_capacity, 2),
         "seed": 14},
    ]
    return [s | {"name": f"{s['name']} #{r + 1}", "seed": s["seed"] + 100 * r} for s in one for r in range(repeats)]


def load1() -> float:
    return os.getloadavg()[0]


def wait_quiet(max_load: float, max_wait: float) -> float:
    t0 = time.monotonic()
    while load1() > max_load and time.monotonic() - t0 < max_wait:
        time.sleep(10)
    return load1()


def sim_args(flags: list[str], rate: float, seed: int, n: int) -> list[str]:
    return [*flags, "--request-rate", str(rate), "--seed", str(seed), "--num-prompts", str(n)]


def arrivals_for(flags: list[str], rate: float, seed: int, n: int):
    from fleetlm.entrypoints.cli import build_parser
    from fleetlm.sim.cli import workload_from_args

    return workload_from_args(build_parser().parse_args(["sim", "--step-time-ms", "1", *sim_args(flags, rate, seed, n)]))


def simulate(profile, flags: list[str], rate: float, seed: int, n: int) -> dict:
    """Metrics of the simulated run (``profile``: a path or a ``Profile``)."""
    from fleetlm.sim import FleetConfig, load_profile
    from fleetlm.sim import simulate as run_sim

    prof = load_profile(profile) if isinstance(profile, str) else profile
    res = run_sim(prof, FleetConfig(), arrivals_for(flags, rate, seed, n))
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


def replay_all(args: argparse.Namespace, scen: list[dict]) -> None:
    """Each scenario in-process, in real time, against one engine (the server's defaults)."""
    from fleetlm import LLM

    llm = LLM()
    for s in scen:
        s["replay_load_before"] = wait_quiet(args.max_load, args.max_wait)
        m = replay(llm, s["flags"], s["rate"], s["seed"], args.num_prompts)
        s["replayed"] = {k: m[k] for k in (*METRICS, "p99_ttft_ms", "mean_ttft_ms", "mean_tpot_ms",
                                           "request_throughput", "completed")}
        print(f"{s['name']}: replayed {json.dumps(s['replayed'])}", flush=True)


def replay(llm, flags: list[str], rate: float, seed: int, n: int) -> dict:
    from fleetlm.bench.serve_datasets import arrival_offsets, build_requests
    from fleetlm.bench.serve_metrics import RequestResult, calculate_metrics
    from fleetlm.entrypoints.cli import build_parser
    from fleetlm.request import Request
    from fleetlm.sampling_params import SamplingParams

    args = build_parser().parse_args(["bench", "serve", *sim_args(flags, rate, seed, n)])
    reqs = build_requests(args)
    send = arrival_offsets(len(reqs), rate, 1.0, seed).tolist()
    core, eos = llm.engine.core, tuple(llm.engine.tokenizer.eos_token_ids)
    res = [RequestResult(prompt_len=r.prompt_len or 0) for r in reqs]
    t0, i = time.perf_counter(), 0
    while i < len(reqs) or core.has_unfinished_requests():
        now = time.perf_counter() - t0
        while i < len(reqs) and send[i] <= now:
            sp = SamplingParams(max_tokens=reqs[i].output_len, temperature=0.0, ignore_eos=True)
            core.add_request(Request(f"replay-{seed}-{i}", list(reqs[i].prompt), sp, eos_token_ids=eos))
            res[i].start_time = t0 + send[i]
            i += 1
        if not core.has_unfinished_requests():
            time.sleep(max(0.0, send[i] - now))
            continue
        outs = core.step()
        t = time.perf_counter()
        for o in outs:
            r = res[int(o.request_id.rsplit("-", 1)[1])]
            for _ in o.new_token_ids:
                if r.output_tokens == 0:
                    r.ttft = t - r.start_time
                else:
                    r.itl.append(t - r.start_time - r.latency)
                r.latency = t - r.start_time
                r.output_tokens += 1
            r.success = r.success or o.finish_reason is not None
    return calculate_metrics(res, time.perf_counter() - t0, percentiles=[50.0, 90.0, 99.0])


def serve_all(args: argparse.Namespace, scen: list[dict], calib: dict) -> list[dict]:
    url = f"http://127.0.0.1:{args.port}"
    cmd = f"{shlex.quote(sys.executable)} -m fleetlm.entrypoints.cli serve --port {args.port}"
    log = Path(tempfile.gettempdir()) / f"sim_fidelity_serve_{os.getpid()}.log"
    print(f"$ {cmd}", flush=True)
    proc = subprocess.Popen(["bash", "-c", cmd], stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, proc)
        for s in [calib, *scen]:
            s["load_before"] = wait_quiet(args.max_load, args.max_wait)
            out = Path(tempfile.gettempdir()) / f"sim_fidelity_{s['seed']}.json"
            m = bench(url, s["flags"], s["rate"], s["seed"], s.get("num_prompts", args.num_prompts), out)
            s["measured"] = {k: m[k] for k in (*METRICS, "p99_ttft_ms", "mean_ttft_ms", "mean_tpot_ms",
                                               "median_ttft_ms", "median_tpot_ms", "request_throughput", "completed")}
            print(f"{s['name']}: measured {json.dumps(s['measured'])}", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
    return scen


def calibrate(profile: str, calib: dict, out: str):
    """The profile with its serving path fitted to the calibration run (not an evaluated one)."""
    from fleetlm.sim import load_profile
    from fleetlm.sim.calibrate import calibrate_serving

    arr = arrivals_for(calib["flags"], calib["rate"], calib["seed"], calib["num_prompts"])
    tuned = calibrate_serving(load_profile(profile), arr, calib["measured"])
    tuned.save(out)
    print(f"calibrated on {calib['name']}: serve_per_token {tuned.serve_per_token_s * 1e6:.0f} us, "
          f"frontend {tuned.frontend_s * 1e3:.1f} ms -> {out}", flush=True)
    return tuned


def compare(profile: str, tuned, scen: list[dict], n: int) -> None:
    keep = (*METRICS, "p99_ttft_ms", "mean_ttft_ms", "mean_tpot_ms", "request_throughput", "completed")
    for s in scen:
        raw = simulate(profile, s["flags"], s["rate"], s["seed"], n)
        cal = simulate(tuned, s["flags"], s["rate"], s["seed"], n)
        s["simulated"] = {k: raw[k] for k in keep}
        s["simulated_calibrated"] = {k: cal[k] for k in keep}
        s["error"] = {k: (cal[k] - s["measured"][k]) / s["measured"][k] for k in METRICS}
        s["error_engine_profile"] = {k: (raw[k] - s["measured"][k]) / s["measured"][k] for k in METRICS}
        if "replayed" in s:
            s["error_vs_replay"] = {k: (raw[k] - s["replayed"][k]) / s["replayed"][k] for k in METRICS}


def table(scen: list[dict]) -> str:
    """Per metric: served (measured) / replayed in-process / simulated with the engine profile /
    simulated with the calibrated profile; errors: calibrated vs served, engine profile vs replay."""
    head = " | ".join(f"{k}: served / replay / sim / sim calibrated (err vs served, sim vs replay)" for k in METRICS)
    rows = [f"| scenario | rate req/s | {head} |", "|---|---|" + "---|" * len(METRICS)]
    nan = float("nan")
    for s in scen:
        rep, raw, cal = s.get("replayed", {}), s["simulated"], s["simulated_calibrated"]
        cells = [f"{s['measured'][k]:,.0f} / {rep.get(k, nan):,.0f} / {raw[k]:,.0f} / {cal[k]:,.0f} "
                 f"({s['error'][k]:+.1%}, {s.get('error_vs_replay', {}).get(k, nan):+.1%})" for k in METRICS]
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
    p.add_argument("--no-replay", action="store_true", help="skip the in-process replay column")
    p.add_argument("--repeats", type=int, default=2, help="runs of each scenario (own seeds)")
    args = p.parse_args()
    tuned_path = str(ROOT / "benchmarks" / "sim_profile_cpu_served.json")
    if args.compare_only:
        doc = json.loads(Path(args.compare_only).read_text())
        profile, scen, calib = args.profile or doc["profile"], doc["scenarios"], doc["calibration"]
    else:
        profile = args.profile or str(ROOT / "benchmarks" / "sim_profile_cpu.json")
        if not args.profile:
            load = wait_quiet(args.max_load, args.max_wait)
            print(f"measuring the profile (load {load:.2f})", flush=True)
            subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", "profile", "--out", profile], check=True)
        rnd = ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128"]
        sp = ["--dataset-name", "shared-prefix", "--shared-prefix-len", "512", "--suffix-len", "64",
              "--num-prefixes", "4", "--random-output-len", "64"]
        cap = capacity(profile, rnd, args.num_prompts)
        scen = scenarios(cap, capacity(profile, sp, args.num_prompts), args.repeats)
        calib = {"name": "random 256/128, calibration (50% of capacity, 32 prompts)", "flags": rnd,
                 "rate": round(0.5 * cap, 2), "seed": 10, "num_prompts": 32}
        if not args.no_replay:
            replay_all(args, scen)
        serve_all(args, scen, calib)
    tuned = calibrate(profile, calib, tuned_path)
    compare(profile, tuned, scen, args.num_prompts)
    doc = {"profile": profile, "calibrated_profile": tuned_path, "num_prompts": args.num_prompts,
           "machine": platform.processor() or platform.machine(), "calibration": calib, "scenarios": scen}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(table(scen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
