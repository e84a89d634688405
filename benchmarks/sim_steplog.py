"""The engine's own steps, logged: where does the simulator's error come from?

Shared by `benchmarks/sim_fidelity.py`: the fidelity workloads, the bench lock, and an
in-process replay of a workload into an `EngineCore` in real time (add what has arrived, step,
record token times: no HTTP, no detokenization, no other process) that logs every step: its
shape (read from the `SchedulerOutput`, as `fleetlm profile` does) and its wall time. From a log:

1. the profile's predicted time for each logged step vs its measured time (by kind of step:
   decode only, prefill only, mixed): is the profile right about the steps this workload makes,
   on the machine as it was during the run?
2. the simulator fed with a profile fitted to the log (the engine's own steps) vs the replay's
   metrics: with the step times right by construction, what is left is the scheduling model.

Run alone (one scenario; takes the bench lock itself):

    python benchmarks/sim_steplog.py --rate 1.88 --seed 12 --profile benchmarks/sim_profile_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METRICS = ("p50_ttft_ms", "p90_ttft_ms", "p50_tpot_ms")
KEEP = (*METRICS, "p99_ttft_ms", "mean_ttft_ms", "mean_tpot_ms", "request_throughput", "completed")
RANDOM = ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128"]
SHARED = ["--dataset-name", "shared-prefix", "--shared-prefix-len", "512", "--suffix-len", "64",
          "--num-prefixes", "4", "--random-output-len", "64"]
LOCK = "/tmp/fleetlm-bench.lock"
TAKE_LOCK = [True]  # False: the caller already holds the bench lock (``flock LOCK python ...``)


def cpu_busy(interval: float = 2.0) -> float:
    """Fraction of all the machine's CPU time that was busy over the next ``interval`` seconds."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    (t0, i0), _ = read(), time.sleep(interval)
    t1, i1 = read()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


@contextlib.contextmanager
def bench_lock(record: dict, max_busy: float = 0.25, max_wait: float = 5.0):
    """Hold the machine's bench lock (as ``flock /tmp/fleetlm-bench.lock``), after waiting (up
    to ``max_wait`` s) for the machine to be quiet: other processes using under ``max_busy`` of
    its CPUs. With sched_autogroup on (Linux's default for sessions), another session's
    ``nice 19`` work still takes its equal share of the cores, so a run is only as clean as
    the machine is quiet. Records the busy fraction and the 1-minute load average it started
    at, and the load after."""
    with open(LOCK, "a") as f:
        if TAKE_LOCK[0]:
            fcntl.flock(f, fcntl.LOCK_EX)
        t0 = time.monotonic()
        busy = cpu_busy()
        while busy > max_busy and time.monotonic() - t0 < max_wait:
            busy = cpu_busy(5.0)
        record.update(busy_before=busy, waited_s=time.monotonic() - t0, load_before=os.getloadavg()[0])
        try:
            yield
        finally:
            record["load_after"] = os.getloadavg()[0]
            if TAKE_LOCK[0]:
                fcntl.flock(f, fcntl.LOCK_UN)


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
    return run_sim(prof, FleetConfig(), arrivals_for(flags, rate, seed, n)).remeasure((50.0, 90.0, 99.0), None)


class StepLog:
    """Wraps one engine core: every ``step()`` that ran one scheduled step is timed and its
    shape recorded."""

    def __init__(self, core) -> None:
        from fleetlm.sim.step_model import shape_of

        self.shapes, self.times, self._cur = [], [], []
        sched, orig_schedule, orig_step = core.scheduler, core.scheduler.schedule, core.step

        def schedule():
            so = orig_schedule()
            if so.total_num_scheduled_tokens:
                self._cur.append(shape_of(so.num_scheduled_tokens, sched.requests)[0])
            return so

        def step():
            self._cur = []
            t0 = time.perf_counter()
            out = orig_step()
            if len(self._cur) == 1:
                self.shapes.append(self._cur[0])
                self.times.append(time.perf_counter() - t0)
            return out

        sched.schedule, core.step = schedule, step

    def clear(self) -> None:
        self.shapes, self.times = [], []


def replay(llm, flags: list[str], rate: float, seed: int, n: int) -> dict:
    """The requests of ``fleetlm bench serve`` (same token ids, same send times) into the
    engine core of ``llm``, in real time; the bench's metrics."""
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
            core.add_request(Request(f"replay-{seed}-{i}-{t0}", list(reqs[i].prompt), sp, eos_token_ids=eos))
            res[i].start_time = t0 + send[i]
            i += 1
        if not core.has_unfinished_requests():
            time.sleep(max(0.0, send[i] - now))
            continue
        outs = core.step()
        t = time.perf_counter()
        for o in outs:
            r = res[int(o.request_id.split("-")[2])]
            for _ in o.new_token_ids:
                if r.output_tokens == 0:
                    r.ttft = t - r.start_time
                else:
                    r.itl.append(t - r.start_time - r.latency)
                r.latency = t - r.start_time
                r.output_tokens += 1
            r.success = r.success or o.finish_reason is not None
    return calculate_metrics(res, time.perf_counter() - t0, percentiles=[50.0, 90.0, 99.0])


def _kind(s) -> str:
    if s.pairs == 0:
        return "decode"
    return "prefill" if s.decode_ctx == 0 else "mixed"


def profile_vs_log(profile, shapes, times) -> dict:
    """Per kind of step: mean measured and predicted step time, and their ratio (sums)."""
    pred, t = np.array([profile.step.time(s) for s in shapes]), np.asarray(times)
    out = {}
    for k in ("decode", "mixed", "prefill", "all"):
        m = np.array([k == "all" or _kind(s) == k for s in shapes])
        if m.any():
            out[k] = {"steps": int(m.sum()), "measured_mean_ms": float(t[m].mean() * 1e3),
                      "predicted_mean_ms": float(pred[m].mean() * 1e3),
                      "predicted_over_measured": float(pred[m].sum() / t[m].sum())}
    return out


def log_fitted_sim(profile, shapes, times, flags, rate, seed, n) -> dict:
    """The simulator with a step model fitted to the logged steps (the engine's own)."""
    from fleetlm.sim.profile_fit import fit_table_model

    model, _ = fit_table_model(shapes, times)
    m = simulate(replace(profile, step=model, serve_per_token_s=0.0, frontend_s=0.0), flags, rate, seed, n)
    return {k: m[k] for k in KEEP}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=str(ROOT / "benchmarks" / "sim_profile_cpu.json"))
    p.add_argument("--workload", choices=("random", "shared-prefix"), default="random")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--out", default="/tmp/sim_steplog.json")
    args = p.parse_args()
    from fleetlm import LLM
    from fleetlm.sim import load_profile

    flags = RANDOM if args.workload == "random" else SHARED
    prof = load_profile(args.profile)
    llm = LLM()
    log = StepLog(llm.engine.core)
    rec: dict = {}
    with bench_lock(rec):
        measured = replay(llm, flags, args.rate, args.seed, args.num_prompts)
    sim = simulate(prof, flags, args.rate, args.seed, args.num_prompts)
    doc = {"args": vars(args), **rec, "steps": profile_vs_log(prof, log.shapes, log.times),
           "replayed": {k: measured[k] for k in KEEP}, "sim_profile": {k: sim[k] for k in KEEP},
           "sim_log_fitted": log_fitted_sim(prof, log.shapes, log.times, flags, args.rate, args.seed,
                                            args.num_prompts),
           "log": [[*s, t] for s, t in zip(log.shapes, log.times)]}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "log"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
