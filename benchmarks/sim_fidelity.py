"""Fidelity of `fleetlm sim`: the same workloads through `fleetlm serve` (measured by `fleetlm
bench serve`) and through the simulator fed with the profile measured on this machine.

Scenarios (--num-prompts each, Poisson arrivals, greedy, ignore_eos), at rates set from the
capacity the fresh profile predicts for one replica (all requests at once), so that "light" is
light on the machine as it is when measured (a shared machine can be several times slower than
a quiet one):
- random 256 prompt / 128 output tokens at 25% (light), 85% (near saturation) and 150%
  (overloaded) of that capacity;
- shared prefix: 4 groups of a 512-token prefix + 64 own tokens, 64 output tokens, at 25% of
  that workload's capacity.
The simulator gets the same flags and seed, so the same lengths and send times
(`fleetlm/bench/serve_datasets.py`).

Phases, each timed run inside the machine's bench lock (one scenario at a time, load average
recorded before and after):
1. `fleetlm profile` (skipped with --profile);
2. served, pass 1 (a fresh server): a calibration run (random 256/128 at 50% of capacity,
   half the prompts, its own seed), then the scenarios;
3. replayed in-process (`benchmarks/sim_steplog.py`): the same requests into an `EngineCore`
   in real time, every step logged: splits the simulator's error into "the profile is off for
   the machine as it was" and "the scheduling model is off";
4. served, pass 2 (another fresh server, so no prefix-cache hits from pass 1): the same
   scenarios with the same seeds. The spread between the passes is the measurement's own noise.

The simulator's serving path (`fleetlm/sim/calibrate.py`) is fitted on the calibration run only.

    python benchmarks/sim_fidelity.py --out benchmarks/sim_fidelity.json       # all phases
    python benchmarks/sim_fidelity.py --compare-only benchmarks/sim_fidelity.json  # re-simulate only
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve import wait_ready  # noqa: E402
from benchmarks.sim_steplog import (  # noqa: E402
    KEEP,
    METRICS,
    RANDOM,
    SHARED,
    TAKE_LOCK,
    StepLog,
    arrivals_for,
    bench_lock,
    log_fitted_sim,
    profile_vs_log,
    replay,
    sim_args,
    simulate,
)

SCENARIOS = (("random 256/128, light", RANDOM, 0.25, 11), ("random 256/128, near saturation", RANDOM, 0.85, 12),
             ("random 256/128, overloaded", RANDOM, 1.5, 13),
             ("shared prefix 4 x 512 + 64 / 64, light", SHARED, 0.25, 14))  # (name, flags, share of capacity, seed)


def capacity(profile: str, flags: list[str], n: int) -> float:
    """Requests/s one simulated replica sustains when all ``n`` arrive at once."""
    return simulate(profile, flags, float("inf"), 0, n)["request_throughput"]


def plan_runs(profile: str, n: int) -> tuple[list[dict], dict]:
    """The scenarios and the calibration run, their rates from the profile's capacity."""
    cap = {id(RANDOM): capacity(profile, RANDOM, n), id(SHARED): capacity(profile, SHARED, n)}
    scen = [{"name": name, "flags": f, "rate": round(share * cap[id(f)], 3), "seed": seed, "capacity": cap[id(f)]}
            for name, f, share, seed in SCENARIOS]
    calib = {"name": "random 256/128, calibration (50% of capacity)", "flags": RANDOM,
             "rate": round(0.5 * cap[id(RANDOM)], 3), "seed": 10, "num_prompts": max(8, n // 2)}
    return scen, calib


def bench(url: str, flags: list[str], rate: float, seed: int, n: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "fleetlm.entrypoints.cli", "bench", "serve", "--base-url", url,
           *sim_args(flags, rate, seed, n), "--ignore-eos", "--disable-tqdm", "--metric-percentiles", "50,90,99",
           "--save-result", str(out)]
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def serve_pass(args: argparse.Namespace, runs: list[dict], key: str) -> None:
    """One fresh server; each run in ``runs`` measured once into ``run[key]``."""
    url = f"http://127.0.0.1:{args.port}"
    cmd = f"{shlex.quote(sys.executable)} -m fleetlm.entrypoints.cli serve --port {args.port}"
    log = Path(tempfile.gettempdir()) / f"sim_fidelity_serve_{os.getpid()}.log"
    print(f"$ {cmd}", flush=True)
    proc = subprocess.Popen(["bash", "-c", cmd], stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, proc)
        for s in runs:
            out = Path(tempfile.gettempdir()) / f"sim_fidelity_{os.getpid()}_{s['seed']}.json"
            rec: dict = {}
            with bench_lock(rec):
                m = bench(url, s["flags"], s["rate"], s["seed"], s.get("num_prompts", args.num_prompts), out)
            s[key] = {k: m[k] for k in (*KEEP, "median_ttft_ms", "median_tpot_ms")} | rec
            print(f"{s['name']}: {key} {json.dumps(s[key])}", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)


def replay_pass(args: argparse.Namespace, scen: list[dict], profile: str) -> None:
    """Each scenario in-process, in real time, against one engine (the server's defaults)."""
    from fleetlm import LLM
    from fleetlm.sim import load_profile

    llm = LLM()
    prof, log = load_profile(profile), StepLog(llm.engine.core)
    for s in scen:
        llm.engine.core.scheduler.kv.reset_prefix_cache()
        log.clear()
        rec: dict = {}
        with bench_lock(rec):
            m = replay(llm, s["flags"], s["rate"], s["seed"], args.num_prompts)
        s["replayed"] = {k: m[k] for k in KEEP} | rec
        s["replay_steps"] = profile_vs_log(prof, log.shapes, log.times)
        s["sim_log_fitted"] = log_fitted_sim(prof, log.shapes, log.times, s["flags"], s["rate"], s["seed"],
                                             args.num_prompts)
        print(f"{s['name']}: replayed {json.dumps(s['replayed'])}; profile/steps "
              f"{s['replay_steps']['all']['predicted_over_measured']:.3f}", flush=True)


def calibrate(profile: str, calib: dict, out: str):
    """The profile with its serving path fitted to the calibration run (not an evaluated one)."""
    from fleetlm.sim import load_profile
    from fleetlm.sim.calibrate import calibrate_serving

    arr = arrivals_for(calib["flags"], calib["rate"], calib["seed"], calib["num_prompts"])
    tuned = calibrate_serving(load_profile(profile), arr, calib["served"])
    tuned.save(out)
    print(f"calibrated on {calib['name']}: serve_per_token {tuned.serve_per_token_s * 1e6:.0f} us, "
          f"frontend {tuned.frontend_s * 1e3:.1f} ms -> {out}", flush=True)
    return tuned


def compare(profile: str, tuned, scen: list[dict], n: int) -> None:
    """Errors of the calibrated simulation against the mean of the served passes; ``spread``:
    (max - min) / mean over the passes."""
    for s in scen:
        raw = simulate(profile, s["flags"], s["rate"], s["seed"], n)
        cal = simulate(tuned, s["flags"], s["rate"], s["seed"], n)
        s["simulated"] = {k: raw[k] for k in KEEP}
        s["simulated_calibrated"] = {k: cal[k] for k in KEEP}
        passes = [s[k] for k in ("served", "served_2") if k in s]
        mean = {k: sum(p[k] for p in passes) / len(passes) for k in METRICS}
        s["served_mean"] = mean
        s["spread"] = {k: (max(p[k] for p in passes) - min(p[k] for p in passes)) / mean[k] for k in METRICS}
        s["error"] = {k: (cal[k] - mean[k]) / mean[k] for k in METRICS}
        s["error_engine_profile"] = {k: (raw[k] - mean[k]) / mean[k] for k in METRICS}
        if "replayed" in s:
            s["error_vs_replay"] = {k: (raw[k] - s["replayed"][k]) / s["replayed"][k] for k in METRICS}
            s["error_log_fitted_vs_replay"] = {k: (s["sim_log_fitted"][k] - s["replayed"][k]) / s["replayed"][k]
                                               for k in METRICS}


def table(scen: list[dict]) -> str:
    """Per metric: the served passes, the simulation (calibrated profile), its error against the
    passes' mean, and the passes' spread."""
    head = " | ".join(f"{k}: served (passes) / sim: error; spread" for k in METRICS)
    rows = [f"| scenario | req/s | {head} |", "|---|---|" + "---|" * len(METRICS)]
    for s in scen:
        passes = [s[k] for k in ("served", "served_2") if k in s]
        cells = [f"{' , '.join(f'{p[k]:,.0f}' for p in passes)} / {s['simulated_calibrated'][k]:,.0f}: "
                 f"**{s['error'][k]:+.1%}**; {s['spread'][k]:.1%}" for k in METRICS]
        rows.append(f"| {s['name']} | {s['rate']:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def diagnosis_table(scen: list[dict]) -> str:
    """The replay: its metrics, the profile's step times over the logged steps', and the errors of
    the simulator with the profile and with a step model fitted to the logged steps."""
    rows = ["| scenario | profile / logged step time | " + " | ".join(
        f"{k}: replay / sim (err) / sim on logged steps (err)" for k in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS)]
    for s in scen:
        if "replayed" not in s:
            continue
        rep, raw, own = s["replayed"], s["simulated"], s["sim_log_fitted"]
        cells = [f"{rep[k]:,.0f} / {raw[k]:,.0f} ({s['error_vs_replay'][k]:+.1%}) / {own[k]:,.0f} "
                 f"({s['error_log_fitted_vs_replay'][k]:+.1%})" for k in METRICS]
        rows.append(f"| {s['name']} | {s['replay_steps']['all']['predicted_over_measured']:.2f} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)


def measure_profile(path: str) -> dict:
    rec: dict = {}
    with bench_lock(rec):
        subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", "profile", "--out", path], check=True)
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/sim_fidelity.json")
    p.add_argument("--profile", help="profile JSON (default: measure one into benchmarks/sim_profile_cpu.json)")
    p.add_argument("--compare-only", help="results JSON of an earlier run: re-simulate, do not serve")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--port", type=int, default=18123)
    p.add_argument("--no-replay", action="store_true", help="skip the in-process replay phase")
    p.add_argument("--lock-held", action="store_true",
                   help="the caller holds the bench lock for the whole run (flock /tmp/fleetlm-bench.lock python ...)")
    args = p.parse_args()
    TAKE_LOCK[0] = not args.lock_held
    tuned_path = str(ROOT / "benchmarks" / "sim_profile_cpu_served.json")
    if args.compare_only:
        doc = json.loads(Path(args.compare_only).read_text())
        profile, scen, calib = args.profile or doc["profile"], doc["scenarios"], doc["calibration"]
        prof_rec = doc.get("profile_load", {})
    else:
        profile = args.profile or str(ROOT / "benchmarks" / "sim_profile_cpu.json")
        prof_rec = {} if args.profile else measure_profile(profile)
        scen, calib = plan_runs(profile, args.num_prompts)
        print("rates: " + ", ".join(f"{s['name']} {s['rate']} req/s" for s in [calib, *scen]), flush=True)
        partial = Path(args.out + ".partial")
        serve_pass(args, [calib, *scen], "served")
        partial.write_text(json.dumps({"profile": profile, "calibration": calib, "scenarios": scen}, indent=1))
        if not args.no_replay:
            replay_pass(args, scen, profile)
            partial.write_text(json.dumps({"profile": profile, "calibration": calib, "scenarios": scen}, indent=1))
        serve_pass(args, scen, "served_2")
    tuned = calibrate(profile, calib, tuned_path)
    compare(profile, tuned, scen, args.num_prompts)
    doc = {"profile": profile, "profile_load": prof_rec, "calibrated_profile": tuned_path,
           "num_prompts": args.num_prompts, "machine": platform.processor() or platform.machine(),
           "calibration": calib, "scenarios": scen}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    Path(args.out + ".partial").unlink(missing_ok=True)  # the crash copy (for --compare-only) is not needed now
    print(table(scen))
    print(diagnosis_table(scen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
