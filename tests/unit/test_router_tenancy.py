"""The router's tenants (issue 15): keys -> tenants, the router's own buckets (429 with
Retry-After), streamed output counted, priority ranges, SIGHUP-style reload, and no key in logs
or metrics. The router runs in process over a fake replica (aiohttp test servers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestServer  # noqa: E402

from fleetlm.router import tenants as router_tenants  # noqa: E402
from fleetlm.router.config import RouterConfig, WorkerSpec  # noqa: E402
from fleetlm.router.server import Router  # noqa: E402

KEYS = ("sk-acme-secret-1", "sk-beta-secret-2", "sk-operator-3")
TENANTS = """\
[tenants.acme]
api_keys = ["sk-acme-secret-1"]
priority_range = [0, 2]
requests_per_minute = 3

[tenants.beta]
api_keys = ["sk-beta-secret-2"]
tokens_per_minute = 100
max_concurrent_requests = 1
"""


class FakeReplica:
    """Answers completions with ``max_tokens`` one-token chunks and a ``usage`` that counts
    ``PROMPT`` prompt tokens, as fleetlm serve does; ``hold`` keeps streams open."""

    PROMPT = 5

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.auth: list[str] = []
        self.hold: asyncio.Event | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health/ready", lambda r: web.json_response({"status": "ok"}))
        app.router.add_get("/metrics", lambda r: web.Response(text=""))
        app.router.add_post("/v1/completions", self.complete)
        return app

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization", ""))
        n = body.get("max_tokens", 4)
        usage = {"prompt_tokens": self.PROMPT, "completion_tokens": n, "total_tokens": self.PROMPT + n}
        if not body.get("stream"):
            return web.json_response({"choices": [{"index": 0, "text": "t" * n}], "usage": usage})
        with_usage = (body.get("stream_options") or {}).get("include_usage") is True
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            if i == 1 and self.hold is not None:
                await self.hold.wait()
            chunk = {"id": "c", "choices": [{"index": 0, "text": "t"}]} | ({"usage": None} if with_usage else {})
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if with_usage:
            await resp.write(f"data: {json.dumps({'id': 'c', 'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@contextlib.asynccontextmanager
async def serving(tmp_path, text: str = TENANTS, api_keys: tuple[str, ...] = (KEYS[2],), **cfg):
    fake = FakeReplica()
    rep = TestServer(fake.app())
    await rep.start_server()
    f = tmp_path / "tenants.toml"
    f.write_text(text)
    config = RouterConfig(workers=(WorkerSpec(str(rep.make_url(""))),), tenants_file=str(f), api_keys=api_keys,
                          health_interval=0.1, max_retries=0, **cfg)
    router = Router(config)
    await router.start()
    assert not await router.pool.wait_all_healthy(10)
    srv = TestServer(router.build_app())
    await srv.start_server()
    try:
        async with aiohttp.ClientSession(str(srv.make_url(""))) as client:
            yield client, router, fake, f
    finally:
        await srv.close()
        await router.close()
        await rep.close()


async def post(client, key: str, **body) -> tuple[int, dict, dict | str]:
    body = {"model": "m", "prompt": "hello", "max_tokens": 4} | body
    async with client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        raw = await r.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = raw.decode()
        return r.status, dict(r.headers), data


def sse_events(text: str) -> list:
    return [json.loads(e[6:]) if e != "data: [DONE]" else "[DONE]" for e in text.split("\n\n") if e]


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(router_tenants, "CLOCK", c)
    return c


def test_keys_map_to_tenants_and_operator_keys_are_the_default_tenant(tmp_path, clock):
    async def go():
        async with serving(tmp_path) as (client, router, fake, _):
            assert (await post(client, KEYS[0]))[0] == 200
            assert (await post(client, KEYS[2]))[0] == 200  # --api-key: tenant "default", no limits
            status, _, err = await post(client, "sk-nobody")
            assert status == 401 and err["error"]["code"] == "invalid_api_key"
            assert fake.auth == [f"Bearer {KEYS[0]}", f"Bearer {KEYS[2]}"]  # the replica sees the client's key
            async with client.get("/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"}) as r:
                assert r.status == 403  # per-tenant metrics are the operator's
            async with client.get("/metrics", headers={"Authorization": f"Bearer {KEYS[2]}"}) as r:
                text = await r.text()
            assert 'fleetlm_router:tenant_requests_total{tenant="acme"} 1.0' in text
            assert 'fleetlm_router:tenant_requests_total{tenant="default"} 1.0' in text

    asyncio.run(go())


def test_requests_per_minute_refuses_the_next_with_a_correct_retry_after(tmp_path, clock):
    async def go():
        async with serving(tmp_path) as (client, _, fake, _f):
            for _ in range(3):
                assert (await post(client, KEYS[0]))[0] == 200
            clock.t += 5  # 3/min: a quarter of a request refilled; the 4th needs 15 s more
            status, headers, err = await post(client, KEYS[0])
            assert status == 429 and headers["Retry-After"] == "15"
            assert err["error"]["type"] == "rate_limit_error" and err["error"]["param"] == "requests_per_minute"
            assert "requests_per_minute" in err["error"]["message"] and len(fake.bodies) == 3
            assert (await post(client, KEYS[1]))[0] == 200  # another tenant is not affected
            clock.t += 14
            assert (await post(client, KEYS[0]))[0] == 429
            clock.t += 1  # the time Retry-After named
            assert (await post(client, KEYS[0]))[0] == 200

    asyncio.run(go())


def test_streamed_output_counts_toward_tokens_per_minute(tmp_path, clock):
    async def go():
        async with serving(tmp_path) as (client, router, fake, _):
            status, _, text = await post(client, KEYS[1], stream=True, max_tokens=60)
            assert status == 200
            events = sse_events(text)
            # the router asked the replica for usage; the client did not, so it sees none
            assert fake.bodies[0]["stream_options"] == {"include_usage": True}
            assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
            assert sum(len(e["choices"][0]["text"]) for e in events[:-1]) == 60
            state = router.tenants.registry.state("beta")
            assert state.tokens.refill() == pytest.approx(100 - 65)  # 5 prompt + 60 streamed
            assert (await post(client, KEYS[1], stream=True, max_tokens=60))[0] == 200  # 35 left: admitted
            status, headers, err = await post(client, KEYS[1])
            assert status == 429 and err["error"]["param"] == "tokens_per_minute"
            assert headers["Retry-After"] == "19"  # -30 tokens: 31 needed at 100/min = 18.6 s
            status, _, text = await post(client, KEYS[2], stream=True, stream_options={"include_usage": True})
            assert sse_events(text)[-2]["usage"]["completion_tokens"] == 4  # asked for: passed through
            async with client.get("/metrics", headers={"Authorization": f"Bearer {KEYS[2]}"}) as r:
                m = await r.text()
            assert 'fleetlm_router:tenant_generation_tokens_total{tenant="beta"} 120.0' in m
            assert 'fleetlm_router:tenant_rate_limited_total{limit="tokens_per_minute",tenant="beta"} 1.0' in m

    asyncio.run(go())


def test_max_concurrent_requests_and_the_slot_comes_back(tmp_path, clock):
    async def go():
        async with serving(tmp_path) as (client, router, fake, _):
            fake.hold = asyncio.Event()
            first = asyncio.create_task(post(client, KEYS[1], stream=True, max_tokens=3))
            while not fake.bodies:
                await asyncio.sleep(0.01)
            status, headers, err = await post(client, KEYS[1])
            assert status == 429 and err["error"]["param"] == "max_concurrent_requests" and headers["Retry-After"]
            assert (await post(client, KEYS[0]))[0] == 200  # acme has no concurrency limit
            fake.hold.set()
            assert (await first)[0] == 200
            assert (await post(client, KEYS[1]))[0] == 200
            assert router.tenants.registry.state("beta").concurrent == 0

    asyncio.run(go())


def test_priority_outside_the_tenants_range_is_a_400_naming_it(tmp_path, clock):
    async def go():
        async with serving(tmp_path) as (client, _, fake, _f):
            status, _, err = await post(client, KEYS[0], priority=3)
            assert status == 400 and err["error"]["param"] == "priority" and "[0, 2]" in err["error"]["message"]
            assert fake.bodies == []  # refused at the router
            assert (await post(client, KEYS[0], priority=2))[0] == 200
            assert fake.bodies[0]["priority"] == 2
            assert (await post(client, KEYS[1], priority=1))[0] == 400  # beta's range is [0, 0]

    asyncio.run(go())


def test_reload_keeps_in_flight_requests_and_a_bad_file_keeps_the_old_table(tmp_path, clock, caplog):
    async def go():
        async with serving(tmp_path) as (client, router, fake, f):
            fake.hold = asyncio.Event()
            first = asyncio.create_task(post(client, KEYS[1], stream=True, max_tokens=3))
            while not fake.bodies:
                await asyncio.sleep(0.01)
            # beta's key moves to a new tenant; acme's limit drops to 1/min
            f.write_text(TENANTS.replace('api_keys = ["sk-beta-secret-2"]', 'api_keys = ["sk-gamma-9"]')
                         .replace("requests_per_minute = 3", "requests_per_minute = 1")
                         + '[tenants.gamma]\napi_keys = ["sk-beta-secret-2x"]\n')
            assert router.tenants.reload()
            assert (await post(client, KEYS[1]))[0] == 401  # a removed key, from now on
            assert (await post(client, "sk-beta-secret-2x"))[0] == 200
            assert (await post(client, KEYS[0]))[0] == 200
            assert (await post(client, KEYS[0]))[0] == 429  # the new, lower limit
            fake.hold.set()
            status, _, text = await first  # admitted before the reload: finishes under the old rules
            assert status == 200 and sse_events(text)[-1] == "[DONE]"
            assert router.tenants.registry.state("beta").concurrent == 0
            f.write_text(TENANTS.replace("tokens_per_minute = 100", "tokens_per_minute = 0"))
            with caplog.at_level(logging.ERROR, "fleetlm"):
                assert not router.tenants.reload()
            assert "tenants.toml:8:" in caplog.text and "tokens_per_minute" in caplog.text
            assert (await post(client, "sk-beta-secret-2x"))[0] == 200  # the old table stays

    asyncio.run(go())


def test_no_key_reaches_logs_or_metrics(tmp_path, clock, caplog):
    async def go():
        async with serving(tmp_path) as (client, router, _, f):
            for key in (*KEYS, "sk-wrong-guess-77"):
                for _ in range(5):
                    await post(client, key, stream=True)
            f.write_text(TENANTS.replace('"sk-beta-secret-2"', '"sk-acme-secret-1"'))  # a key listed twice
            router.tenants.reload()
            async with client.get("/metrics", headers={"Authorization": f"Bearer {KEYS[2]}"}) as r:
                return await r.text()

    with caplog.at_level(logging.DEBUG):
        metrics = asyncio.run(go())
    assert "listed more than once" in caplog.text and "rate_limited" in metrics
    for key in (*KEYS, "sk-wrong-guess-77"):
        assert key not in caplog.text and key not in metrics


def test_bad_tenants_file_at_start_is_exit_2_naming_the_line(tmp_path, capsys):
    from fleetlm.router.__main__ import main

    f = tmp_path / "t.toml"
    f.write_text(TENANTS.replace("requests_per_minute = 3", "requests_per_minute = 3\nburst = 2"))
    assert main(["--worker", "http://127.0.0.1:9", "--tenants", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}:5:" in err and "unknown field 'burst'" in err and "sk-" not in err
    f.write_text(TENANTS)
    assert main(["--worker", "http://127.0.0.1:9", "--tenants", str(f), "--worker-api-key", "w"]) == 2
    assert "--worker-api-key" in capsys.readouterr().err


def test_stream_meter_counts_chat_deltas_across_split_chunks_and_strips_usage():
    from fleetlm.router.tenants import StreamMeter

    class Adm:
        strip_usage, charged, reported = True, 0, None

        def spend_output(self, n):
            self.charged += n

        def on_usage(self, u):
            self.reported = u

    adm = Adm()
    meter = StreamMeter(adm)
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}], "usage": None},
              {"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}], "usage": None},
              {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}]
    raw = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"
    out = b"".join(meter.feed(raw[i:i + 7]) for i in range(0, len(raw), 7)) + meter.flush()
    assert adm.charged == 1 and adm.reported == {"prompt_tokens": 3, "completion_tokens": 1}
    sent = sse_events(out.decode())
    assert sent[-1] == "[DONE]" and len(sent) == 3 and all("usage" not in e for e in sent[:-1])
    assert sent[0]["choices"] == events[0]["choices"]


def test_sighup_reloads_the_running_routers_tenants(tmp_path):
    """The real ``python -m fleetlm.router`` process: SIGHUP adds a key; a bad file is logged
    (naming its line) and the old table stays; no key is ever written to its log."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time
    import urllib.error
    import urllib.request

    loop = asyncio.new_event_loop()
    rep = TestServer(FakeReplica().app(), loop=loop)
    loop.run_until_complete(rep.start_server())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = tmp_path / "tenants.toml"
    f.write_text(TENANTS)
    log = tmp_path / "router.log"
    proc = subprocess.Popen([sys.executable, "-m", "fleetlm.router", "--worker", str(rep.make_url("")), "--port",
                             str(port), "--tenants", str(f), "--health-interval", "0.2"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)

    def status(key: str) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                     data=b'{"prompt": "x", "max_tokens": 2}',
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def wait_for(key: str, want: int) -> bool:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if status(key) == want:
                return True
            time.sleep(0.1)
        return False

    try:
        assert wait_for(KEYS[0], 200)
        assert status("sk-later-key-4") == 401
        f.write_text(TENANTS + '\n[tenants.later]\napi_keys = ["sk-later-key-4"]\n')
        proc.send_signal(signal.SIGHUP)
        assert wait_for("sk-later-key-4", 200)
        f.write_text(TENANTS.replace("priority_range = [0, 2]", "priority_range = [0, 2]\nweight = 0"))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "tenants reload failed" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status("sk-later-key-4") == 200  # the old table stays
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    text = log.read_text()
    assert f"{f}:4:" in text and "weight" in text, text
    assert proc.returncode == 0 and os.path.exists(log)
    for key in (*KEYS, "sk-later-key-4"):
        assert key not in text


def test_with_a_tokenizer_prompt_tokens_are_counted_at_admission(tmp_path, clock, monkeypatch):
    """``--model``: the router counts a prompt's tokens before forwarding it, so a prompt that
    does not fit what is left is refused at the router (and one that can never fit is a 400)."""
    from fleetlm.router.keys import PromptHasher

    tok = PromptHasher("smollm2-135m-instruct", 16).tok
    prompt = "the quick brown fox jumps over the lazy dog " * 6
    n = len(tok.encode(prompt, add_special_tokens=True))
    assert 40 < n < 100
    monkeypatch.setattr(FakeReplica, "PROMPT", n)

    async def go():
        async with serving(tmp_path, model="smollm2-135m-instruct") as (client, router, fake, _):
            assert (await post(client, KEYS[1], prompt=prompt, max_tokens=1))[0] == 200
            state = router.tenants.registry.state("beta")
            assert state.tokens.refill() == pytest.approx(100 - n - 1)
            status, headers, err = await post(client, KEYS[1], prompt=prompt, max_tokens=1)
            assert status == 429 and err["error"]["param"] == "tokens_per_minute" and len(fake.bodies) == 1
            assert int(headers["Retry-After"]) == -(-(n - (100 - n - 1)) * 60 // 100)
            status, _, err = await post(client, KEYS[1], prompt=prompt * 3)
            assert status == 400 and "never be admitted" in err["error"]["message"]

    asyncio.run(go())
