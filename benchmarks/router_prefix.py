"""Shared-prefix workload through ``fleetlm router`` on 2 replicas (one core each), per policy,
next to one replica alone.

    python benchmarks/router_prefix.py --policy prefix-precise --out benchmarks/router_prefix.json

Workload (fixed seed): 16 groups x 8 prompts; each prompt is its group's 1,024-token shared
prefix plus a 64-token question (token ids, so every policy sees the same tokens), 64 output
tokens (ignore_eos), streamed, Poisson arrivals at ``--rate`` req/s in a seeded shuffled order.
Each run starts fresh replicas (``fleetlm serve``, SmolLM2-135M, one intra-op thread, pinned to
CPU 0 and CPU 1) so no run inherits another's cache. Figures: prefix hit rate (the replicas'
own ``fleetlm:prefix_cache_hits / queries``), TTFT p50/p99 (client side) and output tok/s.
``--policy single`` is one replica alone (CPU 0), no router. Results are merged into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time

import httpx

PORTS, ROUTER_PORT, EVENT_PORTS = (18310, 18311), 18312, (18320, 18321)
POLICIES = ("single", "round_robin", "least_load", "prefix-approximate", "prefix-precise")
MODEL = "smollm2-135m-instruct"


def workload(seed: int, groups: int, per_group: int, prefix: int, question: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000, 40000) for _ in range(prefix)] for _ in range(groups)]
    prompts = [p + [rng.randrange(1000, 40000) for _ in range(question)] for p in prefixes for _ in range(per_group)]
    rng.shuffle(prompts)
    return prompts


def start_replica(i: int, events: bool, kv_cache_memory: str | None) -> subprocess.Popen:
    cmd = ["taskset", "-c", str(i), sys.executable, "-m", "fleetlm.entrypoints.cli", "serve", MODEL,
           "--port", str(PORTS[i]), "--num-threads", "1", "--max-num-seqs", "64"]
    if kv_cache_memory:
        cmd += ["--kv-cache-memory", kv_cache_memory]
    if events:
        cmd += ["--kv-events-endpoint", f"tcp://127.0.0.1:{EVENT_PORTS[i]}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_router(policy: str) -> subprocess.Popen:
    name, _, mode = policy.partition("-")
    events = mode == "precise"
    workers = [f"http://127.0.0.1:{p}" + (f",tcp://127.0.0.1:{e}" if events else "")
               for p, e in zip(PORTS, EVENT_PORTS)]
    cmd = [sys.executable, "-m", "fleetlm.router", "--port", str(ROUTER_PORT), "--policy", name,
           *[a for w in workers for a in ("--worker", w)], "--startup-timeout", "300"]
    if mode:
        cmd += ["--prefix-mode", mode]
    if events:
        cmd += ["--model", MODEL]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def prefix_counters(port: int) -> tuple[float, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    vals = {}
    for line in text.splitlines():
        for name in ("fleetlm:prefix_cache_hits_total", "fleetlm:prefix_cache_queries_total"):
            if line.startswith(name):
                vals[name] = vals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return vals.get("fleetlm:prefix_cache_hits_total", 0.0), vals.get("fleetlm:prefix_cache_queries_total", 0.0)


async def one(client: httpx.AsyncClient, url: str, ids: list[int], max_tokens: int) -> tuple[float, int, float]:
    """(TTFT, tokens, TPOT) of one streamed request."""
    body = {"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    t0, ttft, n = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                n += 1
    return ttft, n, (time.perf_counter() - t0 - ttft) / max(1, n - 1)


def send_offsets(n: int, rate: float, seed: int) -> list[float]:
    """When each request is sent, from the first (what ``drive`` sleeps between them)."""
    rng, t, out = random.Random(seed + 1), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def write_trace(path: str, a: argparse.Namespace) -> None:
    """The run's requests as a ``fleetlm sim --trace`` file: send time, lengths, prefix group."""
    prompts = workload(a.seed, a.groups, a.per_group, a.prefix, a.question)
    groups: dict[tuple, int] = {}
    with open(path, "w") as f:
        for t, ids in zip(send_offsets(len(prompts), a.rate, a.seed), prompts):
            g = groups.setdefault(tuple(ids[:a.prefix]), len(groups))
            f.write(json.dumps({"timestamp": t, "input_len": len(ids), "output_len": a.max_tokens,
                                "prefix_group": g, "prefix_len": a.prefix}) + "\n")


async def drive(url: str, prompts: list[list[int]], rate: float, max_tokens: int, seed: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        tasks = []
        for ids, at in zip(prompts, send_offsets(len(prompts), rate, seed)):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, url, ids, max_tokens)))
        res = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ttfts, tpots = sorted(t for t, _, _ in res), sorted(x for _, _, x in res)
    return {"ttft_p50_ms": 1e3 * ttfts[len(ttfts) // 2], "ttft_p90_ms": 1e3 * ttfts[int(len(ttfts) * 0.9)],
            "ttft_p99_ms": 1e3 * ttfts[int(len(ttfts) * 0.99)], "tpot_p50_ms": 1e3 * tpots[len(tpots) // 2],
            "output_tok_s": sum(n for _, n, _ in res) / wall, "wall_s": wall, "requests": len(res)}


def run(policy: str, a: argparse.Namespace) -> dict:
    kv = a.kv_cache_memory if policy != "single" or not a.single_kv_cache_memory else a.single_kv_cache_memory
    reps = [start_replica(i, policy == "prefix-precise", kv) for i in ((0,) if policy == "single" else (0, 1))]
    router = None
    try:
        for i in range(len(reps)):
            wait_ready(f"http://127.0.0.1:{PORTS[i]}/health/ready")
        url = f"http://127.0.0.1:{PORTS[0]}"
        if policy != "single":
            router = start_router(policy)
            wait_ready(f"http://127.0.0.1:{ROUTER_PORT}/health")
            url = f"http://127.0.0.1:{ROUTER_PORT}"
        prompts = workload(a.seed, a.groups, a.per_group, a.prefix, a.question)
        before = [prefix_counters(PORTS[i]) for i in range(len(reps))]
        out = asyncio.run(drive(url, prompts, a.rate, a.max_tokens, a.seed))
        after = [prefix_counters(PORTS[i]) for i in range(len(reps))]
        hits = sum(x[0] - b[0] for x, b in zip(after, before))
        queries = sum(x[1] - b[1] for x, b in zip(after, before))
        out["prefix_hit_rate"] = hits / max(queries, 1)
        return out
    finally:
        for p in ([router] if router else []) + reps:
            p.terminate()
        for p in ([router] if router else []) + reps:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--policy", choices=POLICIES, required=True)
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--per-group", type=int, default=8)
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--question", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-memory", help="each replica's KV cache (e.g. 288MiB); default: the engine's")
    p.add_argument("--single-kv-cache-memory", help="KV cache of --policy single (e.g. the two replicas' sum)")
    p.add_argument("--label", help="key in --out (default: the policy)")
    p.add_argument("--write-trace", metavar="PATH", help="only write the requests as a fleetlm sim trace")
    p.add_argument("--out")
    a = p.parse_args()
    if a.write_trace:
        return write_trace(a.write_trace, a)
    load = os.getloadavg()
    res = run(a.policy, a) | {"load_before": load, "load_after": os.getloadavg(), "rate": a.rate,
                              "kv_cache_memory": a.single_kv_cache_memory if a.policy == "single"
                              and a.single_kv_cache_memory else a.kv_cache_memory}
    label = a.label or a.policy
    print(json.dumps({label: res}, indent=1))
    if a.out:
        prev = json.load(open(a.out)) if os.path.exists(a.out) else {}
        prev[label] = res
        with open(a.out, "w") as f:
            json.dump(prev, f, indent=1)


if __name__ == "__main__":
    main()
