"""Router capacity on one core against a STUB backend (no model: it streams fixed tokens).

    python benchmarks/router_capacity.py --out benchmarks/router_capacity.json

Three processes: the stub (``--stub``: an aiohttp server that answers /v1/completions by
streaming ``--tokens`` SSE chunks ``--interval`` seconds apart, or one JSON body when not
streaming) pinned to CPU 1, ``fleetlm router`` (round_robin over the stub) pinned to CPU 0, and
this load client (CPU 1). Figures:

- added latency: time to first byte through the router minus straight to the stub, one request
  at a time (p50 / p99 of each, 500 requests, non-streaming);
- requests/s: non-streaming requests through the router, 64 in flight, for ``--seconds``; also
  per CPU-second of the router process (what one core sustains when the router has it alone:
  on a shared machine the wall-clock rate understates it);
- concurrent streams: ``--streams`` streams opened through the router, each receiving a token
  every ``--interval`` s; counts streams that got every token, and the router's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time

ROUTER_PORT, STUB_PORT = 18390, 18391


def _lift_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20_000), hard))


# -- the stub backend -------------------------------------------------------------------------------
def run_stub(port: int, tokens: int, interval: float) -> None:
    from aiohttp import web

    chunk = b'data: {"choices": [{"index": 0, "text": "x", "finish_reason": null}]}\n\n'
    full = json.dumps({"choices": [{"index": 0, "text": "x" * tokens, "finish_reason": "length"}]}).encode()

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=full, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(body.get("max_tokens", tokens)):
            if i:
                await asyncio.sleep(interval)
            await resp.write(chunk)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health/ready", ready)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096)


# -- the load client --------------------------------------------------------------------------------
async def _ttfb(session, url: str, body: dict) -> float:
    t0 = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as r:
        await r.content.readany()
        dt = time.perf_counter() - t0
        await r.read()
    return dt


async def added_latency(n: int) -> dict:
    import aiohttp

    body = {"prompt": "hi", "max_tokens": 1}
    out = {}
    async with aiohttp.ClientSession() as s:
        for name, port in (("direct", STUB_PORT), ("router", ROUTER_PORT)):
            url = f"http://127.0.0.1:{port}"
            for _ in range(50):  # warm the connections
                await _ttfb(s, url, body)
            lat = sorted([await _ttfb(s, url, body) for _ in range(n)])
            out[name] = {"p50_ms": 1e3 * lat[n // 2], "p99_ms": 1e3 * lat[int(n * 0.99)]}
    out["added_p50_ms"] = out["router"]["p50_ms"] - out["direct"]["p50_ms"]
    out["added_p99_ms"] = out["router"]["p99_ms"] - out["direct"]["p99_ms"]
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def throughput(seconds: float, concurrency: int, router_pid: int) -> dict:
    import aiohttp

    url, body = f"http://127.0.0.1:{ROUTER_PORT}/v1/completions", {"prompt": "hi", "max_tokens": 16}
    done, errors = 0, 0
    stop = time.perf_counter() + seconds

    async def worker(s):
        nonlocal done, errors
        while time.perf_counter() < stop:
            async with s.post(url, json=body) as r:
                await r.read()
                if r.status == 200:
                    done += 1
                else:
                    errors += 1

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        t0, c0 = time.perf_counter(), _cpu_s(router_pid)
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
        dt, cpu = time.perf_counter() - t0, _cpu_s(router_pid) - c0
    return {"requests_per_s": done / dt, "requests": done, "errors": errors, "concurrency": concurrency,
            "router_cpu_s": cpu, "requests_per_router_cpu_s": done / max(cpu, 1e-9),
            "router_cpu_share": cpu / dt}


async def streams(n: int, tokens: int, router_pid: int) -> dict:
    import aiohttp

    url = f"http://127.0.0.1:{ROUTER_PORT}/v1/completions"
    body = {"prompt": "hi", "max_tokens": tokens, "stream": True}
    complete, peak_rss = 0, 0

    async def one(s):
        nonlocal complete
        got = 0
        try:
            async with s.post(url, json=body) as r:
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        got += 1
                    elif line.startswith(b"data: [DONE]"):
                        complete += got == tokens
        except aiohttp.ClientError:
            pass

    async def watch_rss():
        nonlocal peak_rss
        while True:
            peak_rss = max(peak_rss, _rss_mib(router_pid))
            await asyncio.sleep(0.5)

    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        watcher = asyncio.create_task(watch_rss())
        base = _rss_mib(router_pid)
        tasks = []
        for i in range(n):  # open them over ~2 s, as a crowd arrives
            tasks.append(asyncio.create_task(one(s)))
            if i % 250 == 249:
                await asyncio.sleep(0.1)
        await asyncio.gather(*tasks)
        watcher.cancel()
    return {"streams": n, "complete_streams": complete, "router_rss_idle_mib": base, "router_rss_peak_mib": peak_rss}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _wait_http(url: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stub", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--streams", type=int, default=5000)
    p.add_argument("--stream-tokens", type=int, default=20)
    p.add_argument("--out")
    a = p.parse_args()
    _lift_fd_limit()
    if a.stub:
        return run_stub(STUB_PORT, a.tokens, a.interval)
    os.sched_setaffinity(0, {1})
    stub = subprocess.Popen(["taskset", "-c", "1", sys.executable, __file__, "--stub", "--tokens", str(a.tokens),
                             "--interval", str(a.interval)])
    router = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "fleetlm.router",
                               "--worker", f"http://127.0.0.1:{STUB_PORT}", "--port", str(ROUTER_PORT),
                               "--policy", "round_robin"], stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{ROUTER_PORT}/health")
        res = {"latency": asyncio.run(added_latency(500)),
               "throughput": asyncio.run(throughput(a.seconds, 64, router.pid)),
               "streams": asyncio.run(streams(a.streams, a.stream_tokens, router.pid)),
               "stub": {"tokens": a.tokens, "interval_s": a.interval}, "cpu": _cpu(),
               "load_before": os.getloadavg()}
    finally:
        for proc in (router, stub):
            proc.terminate()
            proc.wait(30)
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
