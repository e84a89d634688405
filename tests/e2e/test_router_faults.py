"""Router faults: a replica killed mid-load, bad input at start and on the admin routes, drain."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx

from tests.e2e.test_router import TIMEOUT, RouterProcess, model_dir, start_replica  # noqa: F401
from tests.server_utils import free_port


async def _stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[str, bool]:
    """(outcome, saw_done): outcome is 'ok', 'error_event' or 'status_N'."""
    body = {"model": "tiny", "prompt": "count with me", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return f"status_{r.status_code}", False
        outcome, done = "ok", False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: ") and "error" in json.loads(line[6:]):
                outcome = "error_event"
        return outcome, done


def _wait_idle(srv, timeout: float = 30) -> None:
    from tests.e2e.test_router import metric_of

    deadline = time.monotonic() + timeout
    while metric_of(srv.url, "fleetlm:kv_cache_usage_perc") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric_of(srv.url, "fleetlm:kv_cache_usage_perc") == 0.0
    assert metric_of(srv.url, "fleetlm:num_requests_running") == 0


def _health(router) -> dict:
    return {w["url"]: w["healthy"] for w in httpx.get(router.url + "/health", timeout=10).json()["workers"]}


def test_a_killed_replica_costs_only_its_streams_and_returns(model_dir):  # noqa: F811
    a, b = start_replica(model_dir), start_replica(model_dir)
    try:
        with RouterProcess([a.url, b.url], ["--policy", "round_robin", "--breaker-cooldown", "1"]) as router:
            async def scenario():
                async with httpx.AsyncClient(timeout=TIMEOUT) as c:
                    running = [asyncio.create_task(_stream(c, router.url, 400)) for _ in range(6)]
                    await asyncio.sleep(1.0)  # streams under way on both replicas
                    a.proc.kill()
                    first = await asyncio.gather(*running)  # a hang fails here as a client timeout
                    later = await asyncio.gather(*(_stream(c, router.url, 8) for _ in range(6)))
                    return first, later

            first, later = asyncio.run(scenario())
            assert all(done for _, done in first), first  # every stream ended cleanly, none hung
            assert {o for o, _ in first} <= {"ok", "error_event"}
            assert [o for o, _ in later] == ["ok"] * 6  # new requests go to (or retry on) the survivor
            _wait_idle(b)  # every request it took ended there too: its KV blocks are back in the pool
            deadline = time.monotonic() + 10
            while _health(router)[a.url] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _health(router) == {a.url: False, b.url: True}
            a.proc.wait(30)
            a2 = start_replica(model_dir, port=a.port)  # it comes back on the same address
            try:
                deadline = time.monotonic() + 20
                while not _health(router)[a.url] and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert _health(router)[a.url]
            finally:
                a2.__exit__(None, None, None)
    finally:
        for s in (a, b):
            s.__exit__(None, None, None)


def _router_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", "router", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_bad_start_exits_2_naming_the_problem():
    r = _router_cli("--policy", "fastest")
    assert r.returncode == 2 and "unknown routing policy 'fastest'" in r.stderr
    dead = f"http://127.0.0.1:{free_port()}"
    r = _router_cli("--worker", dead, "--startup-timeout", "1", "--port", str(free_port()))
    assert r.returncode == 2 and dead in r.stderr and "never became healthy" in r.stderr
    r = _router_cli("--worker", "http://a:1", "--worker", "http://a:1")
    assert r.returncode == 2 and "more than once" in r.stderr
    r = _router_cli("--policy", "prefix", "--prefix-mode", "precise")
    assert r.returncode == 2 and "--model" in r.stderr


def test_admin_routes_need_their_key_and_refuse_bad_workers(model_dir):  # noqa: F811
    srv = start_replica(model_dir)
    try:  # no worker at start: /health says 503 until one is added
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "fleetlm.entrypoints.cli", "router", "--port", str(port),
                                 "--admin-key", "adm", "--add-timeout", "1"], stderr=subprocess.DEVNULL)
        url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer adm"}
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 503:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert httpx.post(url + "/workers", json={"url": srv.url}, timeout=10).status_code == 401
        assert httpx.post(url + "/workers", json={"url": srv.url}, headers={"Authorization": "Bearer x"},
                          timeout=10).status_code == 401
        r = httpx.post(url + "/workers", json={"url": srv.url}, headers=auth, timeout=30)
        assert r.status_code == 201, r.text
        r = httpx.post(url + "/workers", json={"url": srv.url}, headers=auth, timeout=30)
        assert r.status_code == 409 and "already" in r.json()["error"]["message"]
        dead = f"http://127.0.0.1:{free_port()}"
        r = httpx.post(url + "/workers", json={"url": dead}, headers=auth, timeout=30)
        assert r.status_code == 422 and dead in r.json()["error"]["message"]
        r = httpx.post(url + "/workers", json={"url": srv.url, "weight": 2}, headers=auth, timeout=30)
        assert r.status_code == 400 and "weight" in r.json()["error"]["message"]
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT).status_code == 200
        r = httpx.request("DELETE", url + "/workers", params={"url": dead}, headers=auth, timeout=10)
        assert r.status_code == 404
        assert httpx.request("DELETE", url + "/workers", params={"url": srv.url}, headers=auth,
                             timeout=10).status_code == 200
        r = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_replica"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        srv.__exit__(None, None, None)


def test_client_keys_and_admin_routes_refused_without_an_admin_key(model_dir):  # noqa: F811
    srv = start_replica(model_dir)
    try:
        with RouterProcess([srv.url], ["--api-key", "k1"]) as router:
            r = httpx.post(router.url + "/workers", json={"url": srv.url}, timeout=10)
            assert r.status_code == 403 and "--admin-key" in r.json()["error"]["message"]
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
            r = httpx.post(router.url + "/v1/completions", json=body, timeout=TIMEOUT)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = httpx.post(router.url + "/v1/completions", json=body, headers={"Authorization": "Bearer k1"},
                           timeout=TIMEOUT)
            assert r.status_code == 200  # forwarded with the client's header (this replica needs no key)
            assert httpx.get(router.url + "/health", timeout=10).status_code == 200  # probes stay open
    finally:
        srv.__exit__(None, None, None)


def test_sigterm_drains_in_flight_streams(model_dir):  # noqa: F811
    srv = start_replica(model_dir)
    try:
        router = RouterProcess([srv.url], ["--shutdown-timeout", "60"]).__enter__()

        async def scenario():
            async with httpx.AsyncClient(timeout=TIMEOUT) as c:
                task = asyncio.create_task(_stream(c, router.url, 3000))  # long enough to outlast the checks
                await asyncio.sleep(0.5)
                router.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                late = await c.post(router.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
                return await task, late.status_code

        (outcome, done), late_status = asyncio.run(scenario())
        assert (outcome, done) == ("ok", True)  # the stream in flight finished
        assert late_status == 503  # new work refused while draining
        assert router.proc.wait(30) == 0
        router.__exit__(None, None, None)
    finally:
        srv.__exit__(None, None, None)
