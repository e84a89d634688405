"""Issue 15: the cost of salting and per-tenant accounting.

1. The main offline workload (64 requests x 256 random prompt tokens, 128 output tokens, greedy,
   ignore_eos, bf16; numpy seed 0), prefix caching on so every block is hashed, through the
   in-process ``EngineCore``: ``plain`` (fcfs, no tenancy) vs ``tenants`` (fair policy, four
   tenants round-robin, every request salted). Runs alternate (plain, tenants, plain, ...).
2. The control plane alone (no model): one scheduler step with 128 running decodes, and one
   full-block hash with and without a salt key.

    flock /tmp/fleetlm-bench.lock python benchmarks/tenancy_overhead.py --out benchmarks/tenancy_overhead.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fleetlm.config import CacheConfig, EngineArgs, SchedulerConfig
from fleetlm.core.block_pool import hash_block
from fleetlm.core.sched_output import ModelRunnerOutput
from fleetlm.core.scheduler import Scheduler
from fleetlm.request import NO_TENANCY, Request, Tenancy
from fleetlm.sampling_params import SamplingParams

TENANTS = [Tenancy(tenant_id=f"t{i}", weight=1.0 + i, cache_salt=f"salt-{i}") for i in range(4)]


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 40000, length).tolist() for _ in range(n)]


def offline_run(core, ps: list[list[int]], out: int, tenants: bool, tag: str) -> float:
    sp = SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)
    core.scheduler.kv.reset_prefix_cache()
    t = time.monotonic()
    for i, ids in enumerate(ps):
        core.add_request(Request(f"{tag}-{i}", ids, sp, tenancy=TENANTS[i % 4] if tenants else NO_TENANCY))
    n = 0
    while core.has_unfinished_requests():
        n += sum(len(o.new_token_ids) for o in core.step())
    dt = time.monotonic() - t
    assert n == len(ps) * out
    return n / dt


def build(policy: str):
    from fleetlm.engine.engine_core import EngineCore
    from fleetlm.engine.processor import load_engine_parts

    args = EngineArgs(dtype="bfloat16", scheduling_policy=policy, enable_prefix_caching=True, kv_cache_memory=1 << 30)
    files, dtype, max_len = load_engine_parts(args)
    return EngineCore(args, files, dtype, max_len)


def control_plane(policy: str, tenants: bool, steps: int = 300) -> float:
    """Mean seconds per schedule + update with 128 running decodes (fake model)."""
    s = Scheduler(SchedulerConfig(2048, 128, 4096, scheduling_policy=policy), CacheConfig(16, 8192, True))
    for i, ids in enumerate(prompts(128, 256, seed=1)):
        s.add_request(Request(f"r{i}", ids, SamplingParams(max_tokens=2_000, ignore_eos=True),
                              tenancy=TENANTS[i % 4] if tenants else NO_TENANCY))
    for _ in range(2):  # prefill out of the way
        so = s.schedule()
        s.kv.commit(so.step_id)
        s.update_from_output(so, ModelRunnerOutput(list(so.num_scheduled_tokens), [[7]] * len(so.num_scheduled_tokens)))
    t = time.perf_counter()
    for _ in range(steps):
        so = s.schedule()
        s.kv.commit(so.step_id)
        s.update_from_output(so, ModelRunnerOutput(list(so.num_scheduled_tokens), [[7]] * len(so.num_scheduled_tokens)))
    return (time.perf_counter() - t) / steps


def hash_cost(n: int = 20000) -> dict[str, float]:
    toks = list(range(16))
    out = {}
    for name, extra in (("no_salt", ()), ("salt", ("salt", "0" * 64))):
        t = time.perf_counter()
        for _ in range(n):
            hash_block(None, toks, extra)
        out[name] = (time.perf_counter() - t) / n
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="benchmarks/tenancy_overhead.json")
    a = p.parse_args()
    result: dict = {"args": vars(a), "control_plane_step_s": {}, "hash_block_s": hash_cost()}
    for policy, tenants in (("fcfs", False), ("fair", True)):
        result["control_plane_step_s"][f"{policy}{'+salted' if tenants else ''}"] = control_plane(policy, tenants)
    print(json.dumps(result, indent=1), flush=True)
    ps = prompts(a.requests, a.prompt)
    cores = {"plain": build("fcfs"), "tenants": build("fair")}
    for core in cores.values():  # warm-up
        offline_run(core, ps[:4], 8, False, "warm")
    runs: dict[str, list[float]] = {"plain": [], "tenants": []}
    for r in range(a.repeats):
        for name in ("plain", "tenants"):
            runs[name].append(offline_run(cores[name], ps, a.output, name == "tenants", f"{name}{r}"))
            print(name, r, f"{runs[name][-1]:.1f} output tok/s", flush=True)
    for core in cores.values():
        core.shutdown()
    result["offline_output_tok_s"] = runs
    result["tenants_over_plain"] = float(np.median(runs["tenants"]) / np.median(runs["plain"]))
    print(json.dumps(result, indent=1))
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
