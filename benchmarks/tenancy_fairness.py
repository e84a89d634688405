"""Issue 15 figures on the real engine (in-process ``EngineCore``, fixed seed and workload):

1. overload: a heavy tenant sends faster than the engine serves, a light tenant sends a few
   requests; FCFS vs the fair policy: the light tenant's TTFT (p50/p99) and service share, and
   total throughput;
2. the side channel: TTFT of a long prompt cold, cached for its owner, and sent by another
   tenant (salted: must look cold).

    flock /tmp/fleetlm-bench.lock python benchmarks/tenancy_fairness.py --out benchmarks/tenancy_fairness.json

Open loop: requests are added when their arrival time has passed (checked between steps);
TTFT = first token out of ``EngineCore.step`` minus arrival.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fleetlm.config import EngineArgs
from fleetlm.request import Request, Tenancy
from fleetlm.sampling_params import SamplingParams


def build_core(policy: str, max_num_seqs: int, caching: bool):
    from fleetlm.engine.engine_core import EngineCore
    from fleetlm.engine.processor import load_engine_parts

    args = EngineArgs(dtype="bfloat16", max_num_seqs=max_num_seqs, scheduling_policy=policy,
                      enable_prefix_caching=caching, kv_cache_memory=512 << 20)
    files, dtype, max_len = load_engine_parts(args)
    return EngineCore(args, files, dtype, max_len)


def workload(seed: int, duration: float, heavy_rate: float, light_rate: float, prompt: int,
             heavy_out: int, light_out: int, light_prompt: int) -> list[tuple[float, str, list[int], int]]:
    """(arrival s, tenant, prompt ids, output tokens), sorted by arrival; Poisson arrivals, random
    distinct prompts; heavy outputs uniform in [out/2, 3 out/2] so its requests do not finish in
    lock-step (which would free every slot at once)."""
    rng = np.random.default_rng(seed)
    out = []
    for tenant, rate, n_out, n_in in (("heavy", heavy_rate, heavy_out, prompt),
                                      ("light", light_rate, light_out, light_prompt)):
        t = 0.0
        while True:
            t += rng.exponential(1.0 / rate)
            if t >= duration:
                break
            n = int(rng.integers(n_out // 2, n_out * 3 // 2 + 1)) if tenant == "heavy" else n_out  # staggered finishes
            out.append((t, tenant, rng.integers(100, 40000, n_in).tolist(), n))
    return sorted(out, key=lambda x: x[0])


def run_overload(core, reqs, weights: dict[str, float], window: float) -> dict:
    t0, i, pending = time.monotonic(), 0, {}
    ttft: dict[str, list[float]] = {"heavy": [], "light": []}
    tokens = {"heavy": 0, "light": 0}
    in_window = {"heavy": 0, "light": 0}  # served while arrivals still come (both tenants sending)
    steps, busy = 0, 0.0
    while i < len(reqs) or core.has_unfinished_requests():
        now = time.monotonic() - t0
        while i < len(reqs) and reqs[i][0] <= now:
            arr, tenant, ids, n_out = reqs[i]
            rid = f"{tenant}-{i}"
            sp = SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
            core.add_request(Request(rid, ids, sp, arrival_time=t0 + arr,
                                     tenancy=Tenancy(tenant_id=tenant, weight=weights[tenant], cache_salt=tenant)))
            pending[rid] = (tenant, t0 + arr, len(ids))
            i += 1
        if not core.has_unfinished_requests():
            time.sleep(max(0.0, min(0.01, reqs[i][0] - now)))
            continue
        ts = time.monotonic()
        outs = core.step()
        busy += time.monotonic() - ts
        steps += 1
        for o in outs:
            tenant, arrival, n_prompt = pending[o.request_id]
            served = len(o.new_token_ids)
            if o.new_token_ids and n_prompt >= 0:
                ttft[tenant].append(time.monotonic() - arrival)
                served += n_prompt  # prompt served once its first token is out
                pending[o.request_id] = (tenant, arrival, -1)
            tokens[tenant] += served
            if time.monotonic() - t0 <= window:
                in_window[tenant] += served
    wall = time.monotonic() - t0
    total = sum(tokens.values())
    return {"wall_s": wall, "total_tok_s": total / wall, "busy_s": busy, "steps": steps,
            "tok_per_busy_s": total / busy, "tokens": tokens, "tokens_in_window": in_window,
            "light_share": tokens["light"] / total,
            "light_share_in_window": in_window["light"] / max(1, sum(in_window.values())),
            "light_ttft_p50_s": float(np.percentile(ttft["light"], 50)),
            "light_ttft_p99_s": float(np.percentile(ttft["light"], 99)),
            "heavy_ttft_p50_s": float(np.percentile(ttft["heavy"], 50)),
            "heavy_ttft_p99_s": float(np.percentile(ttft["heavy"], 99)),
            "n_light": len(ttft["light"]), "n_heavy": len(ttft["heavy"])}


def ttft_once(core, rid: str, ids: list[int], salt: str) -> tuple[float, int]:
    sp = SamplingParams(max_tokens=1, temperature=0)
    hits = core.scheduler.kv.stats.hits
    t = time.monotonic()
    core.add_request(Request(rid, ids, sp, tenancy=Tenancy(tenant_id=salt, cache_salt=salt)))
    while core.has_unfinished_requests():
        core.step()
    return time.monotonic() - t, core.scheduler.kv.stats.hits - hits


def run_side_channel(seed: int, n_prompt: int, repeats: int) -> dict:
    core = build_core("fair", 8, caching=True)
    rng = np.random.default_rng(seed + 1)
    rows = {"cold": [], "owner_cached": [], "other_tenant": []}
    hits = {k: 0 for k in rows}
    for r in range(repeats):
        ids = rng.integers(100, 40000, n_prompt).tolist()
        for kind, salt in (("cold", "A"), ("owner_cached", "A"), ("other_tenant", "B")):
            dt, h = ttft_once(core, f"{kind}-{r}", ids, salt)
            rows[kind].append(dt)
            hits[kind] += h
    core.shutdown()
    return {k: {"ttft_median_s": float(np.median(v)), "prefix_hit_tokens": hits[k]} for k, v in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals")
    p.add_argument("--heavy-rate", type=float, default=5.0, help="heavy tenant requests/s (above capacity)")
    p.add_argument("--light-rate", type=float, default=1.0, help="well under half the capacity")
    p.add_argument("--light-prompt", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--heavy-out", type=int, default=32)
    p.add_argument("--light-out", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--side-prompt", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="benchmarks/tenancy_fairness.json")
    a = p.parse_args()
    reqs = workload(a.seed, a.duration, a.heavy_rate, a.light_rate, a.prompt, a.heavy_out, a.light_out,
                    a.light_prompt)
    result = {"args": vars(a), "overload": {"fcfs": [], "fair": []}}
    cores = {p: build_core(p, a.max_num_seqs, caching=False) for p in ("fcfs", "fair")}
    for core in cores.values():
        core.add_request(Request("warmup", list(range(1, 65)), SamplingParams(max_tokens=4)))
        while core.has_unfinished_requests():
            core.step()
    for _ in range(a.repeats):  # alternate, so slow spells of a shared machine hit both
        for policy, core in cores.items():
            result["overload"][policy].append(run_overload(core, reqs, {"heavy": 1.0, "light": 1.0}, a.duration))
            print(policy, json.dumps(result["overload"][policy][-1]), flush=True)
    for core in cores.values():
        core.shutdown()

    def med(policy: str, key: str) -> float:
        return float(np.median([r[key] for r in result["overload"][policy]]))

    result["light_ttft_p99_fcfs_over_fair"] = med("fcfs", "light_ttft_p99_s") / med("fair", "light_ttft_p99_s")
    result["throughput_fair_over_fcfs"] = med("fair", "total_tok_s") / med("fcfs", "total_tok_s")
    result["busy_throughput_fair_over_fcfs"] = med("fair", "tok_per_busy_s") / med("fcfs", "tok_per_busy_s")
    result["side_channel"] = run_side_channel(a.seed, a.side_prompt, 3)
    print(json.dumps({k: v for k, v in result.items() if k != "overload"}, indent=1))
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
