"""Interference: 8 steady decode streams while long prompts arrive, co-located vs disaggregated.

- co-located: one ``fleetlm serve`` on both cores (``taskset -c 0,1``, 2 threads);
- disaggregated: a prefill worker on core 0 and a decode worker on core 1 (one thread each,
  ``--kv-transfer-config`` producer / consumer, tcp), behind ``fleetlm router --pd``.

The 8 streams (short prompts, ``ignore_eos``) start first; after a warm-up, prompts of
``--prompt-tokens`` random token ids (no prefix hits) arrive every ``--interval`` seconds for
``--window`` seconds, each asking for a few tokens. Reported: the streams' inter-token latency
(ITL: gaps between SSE chunks, one token each) p50/p99 and TPOT inside the window, and the long
prompts' TTFT. Every request is streamed.

    flock /tmp/fleetlm-bench.lock python benchmarks/disagg_interference.py --out benchmarks/disagg_interference.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tests.server_utils import ServerProcess, free_port  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def stream(client: httpx.AsyncClient, body: dict, stamps: list[float], stop: asyncio.Event) -> None:
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"text"' in line:
                stamps.append(time.perf_counter())
            if stop.is_set():
                return


async def workload(url: str, args) -> dict:
    rng = random.Random(0)
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        streams = [[] for _ in range(args.streams)]
        tasks = [asyncio.create_task(stream(c, {"prompt": f"Stream {i}: count slowly from one to a thousand.",
                                                "max_tokens": args.stream_max_tokens, "temperature": 0, "ignore_eos": True},
                                            streams[i], stop)) for i in range(args.streams)]
        await asyncio.sleep(args.warmup)
        t0 = time.perf_counter()
        ttfts, longs = [], []

        async def long_prompt() -> None:
            ids = [rng.randrange(1000, 40000) for _ in range(args.prompt_tokens)]
            st: list[float] = []
            t = time.perf_counter()
            await stream(c, {"prompt": ids, "max_tokens": 4, "temperature": 0, "ignore_eos": True}, st, asyncio.Event())
            if st:
                ttfts.append(st[0] - t)

        while time.perf_counter() - t0 < args.window:
            longs.append(asyncio.create_task(long_prompt()))
            await asyncio.sleep(args.interval)
        t1 = time.perf_counter()
        stop.set()
        await asyncio.wait(longs, timeout=args.grace)  # then give up on the queue (an overloaded run)
        for t in tasks + longs:
            t.cancel()
        await asyncio.gather(*tasks, *longs, return_exceptions=True)
    gaps, tpots = [], []
    for st in streams:  # gaps ending inside the window, and the one still open at its end
        gaps += [b - a for a, b in zip(st, st[1:]) if t0 <= b <= t1]
        before = [s for s in st if s <= t1]
        if before:
            gaps.append(t1 - before[-1])
        inside = [s for s in st if t0 <= s <= t1]
        if len(inside) > 1:
            tpots.append((inside[-1] - inside[0]) / (len(inside) - 1))
    return {"itl_p50_ms": pct(gaps, 0.5) * 1e3, "itl_p99_ms": pct(gaps, 0.99) * 1e3,
            "itl_max_ms": max(gaps) * 1e3 if gaps else None, "tpot_ms": statistics.mean(tpots) * 1e3 if tpots else None,
            "stream_tokens_in_window": sum(len([s for s in st if t0 <= s <= t1]) for st in streams),
            "long_prompts_sent": len(longs),
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99), "long_prompts_done": len(ttfts)}


def colocated(args) -> dict:
    srv = ServerProcess(["--num-threads", "2", "--dtype", args.dtype], model=args.model)
    srv.cmd = ["taskset", "-c", "0,1", *srv.cmd]
    with srv:
        return asyncio.run(workload(srv.url, args))


@contextmanager
def pd_pair(worker_args: list[str], model: str = "smollm2-135m-instruct"):
    """A prefill worker pinned to CPU 0 and a decode worker pinned to CPU 1 (tcp K/V transfer,
    ``worker_args`` given to both), behind ``fleetlm router --pd``; yields the router's URL."""
    addr = f"127.0.0.1:{free_port()}"
    cfg = {"transport": "tcp", "handle_ttl_s": 120}
    p = ServerProcess([*worker_args, "--kv-transfer-config", json.dumps({**cfg, "role": "producer", "address": addr})],
                      model=model)
    d = ServerProcess([*worker_args, "--kv-transfer-config",
                       json.dumps({**cfg, "role": "consumer", "producers": [addr]})], model=model)
    p.cmd, d.cmd = ["taskset", "-c", "0", *p.cmd], ["taskset", "-c", "1", *d.cmd]
    with p, d:
        port = free_port()
        router = subprocess.Popen([sys.executable, "-m", "fleetlm.entrypoints.cli", "router", "--pd", "--port", str(port),
                                   "--prefill", p.url, "--decode", d.url], stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    if httpx.get(url + "/health/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            else:
                raise TimeoutError(f"the P/D router at {url} never became ready")
            yield url
        finally:
            router.terminate()
            router.wait(10)


def disaggregated(args) -> dict:
    with pd_pair(["--num-threads", "1", "--dtype", args.dtype], args.model) as url:
        return asyncio.run(workload(url, args))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--stream-max-tokens", type=int, default=3000)
    ap.add_argument("--grace", type=float, default=20.0, help="seconds to let queued long prompts finish")
    ap.add_argument("--out")
    args = ap.parse_args()
    res = {"colocated": colocated(args), "disaggregated": disaggregated(args), "config": vars(args)}
    c, d = res["colocated"], res["disaggregated"]
    res["itl_p99_ratio"] = c["itl_p99_ms"] / d["itl_p99_ms"]
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
