"""Fault handling and security of ``fleetlm serve``, end to end on real server processes.

Every test talks HTTP to a real ``fleetlm serve`` process running a tiny random-weight model
(``make_tiny_hf_dir``, 4096-token context so a "long" request really is long). Each distinct
server configuration starts once, in a class-scoped fixture, so at most one or two servers are
alive at a time. The checks are about behaviour: status codes, error bodies, complete outputs,
and the engine's own gauges (``fleetlm:kv_cache_free_blocks`` back at its starting value,
nothing running or waiting) -- never about how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow

MODEL_NAME = "tiny"
# One intra-op thread: the engine core leaves a core to the front end and the test client
# (CI has two), which keeps the in-flight/draining windows these tests rely on wide.
BASE = ["--dtype", "float32", "--kv-cache-memory", "32MiB", "--num-threads", "1",
        "--served-model-name", MODEL_NAME]
FREE, RUNNING, WAITING = "fleetlm:kv_cache_free_blocks", "fleetlm:num_requests_running", "fleetlm:num_requests_waiting"
LONG = 4000  # tokens: long enough that a request is still running when the test acts on it
CLIENT_TIMEOUT = 120.0  # a hang shows up as a client timeout, never as a stuck test run


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tests.helpers import make_tiny_hf_dir

    return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny_serve_faults"), max_position_embeddings=4096)


def metric(srv: ServerProcess, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 if there are none)."""
    text = httpx.get(srv.url + "/metrics", headers=srv.headers, timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if any(f'{k}="{v}"' not in line for k, v in labels.items()):
            continue
        total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(pred, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def idle_state(srv: ServerProcess) -> tuple[float, float, float]:
    return metric(srv, FREE), metric(srv, RUNNING), metric(srv, WAITING)


def wait_idle(srv: ServerProcess, free_at_start: float, timeout: float = 60.0) -> None:
    """Every KV block back in the pool, nothing running or waiting (polled up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        state = idle_state(srv)
        if state == (free_at_start, 0, 0):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout} s: (free, running, waiting) = {state}, "
                                 f"expected ({free_at_start}, 0, 0)\n{srv.log()[-4000:]}")
        time.sleep(0.1)


def start_free_blocks(srv: ServerProcess) -> float:
    """The free-block gauge of an idle engine (on an idle server, /health pings the engine core,
    whose answer refreshes the gauges)."""
    assert httpx.get(srv.url + "/health", timeout=60).status_code == 200
    free, running, waiting = idle_state(srv)
    assert (running, waiting) == (0, 0), "the server is not idle at the start of the test"
    assert free > 0
    return free


def assert_error_body(body: dict, *, type_: str | None = None, code: str | None = None) -> dict:
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    if type_ is not None:
        assert err["type"] == type_, err
    if code is not None:
        assert err["code"] == code, err
    return err


def assert_error_response(r: httpx.Response, status: int, *, type_: str | None = None,
                          code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    return assert_error_body(r.json(), type_=type_, code=code)


def parse_sse(text: str) -> list:
    """The ``data:`` payloads of an SSE body: parsed JSON objects, and the string "[DONE]".
    (SSE lines end at CR/LF only: ``str.splitlines``, and so httpx's ``iter_lines``, would also
    split inside a token's text at U+0085 or U+2028.)"""
    events = []
    for line in text.split("\n"):
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def sse_lines(r: httpx.Response):
    buf = ""
    async for chunk in r.aiter_text():
        buf += chunk
        while "\n" in buf:
            line, buf = buf.split("\n", 1)
            yield line.rstrip("\r")


async def read_stream(client: httpx.AsyncClient, url: str, body: dict, *, headers: dict | None = None,
                      started: asyncio.Event | None = None) -> tuple[int, list]:
    """POST a streaming request and read it to the end; ``started`` is set at the first event."""
    events: list = []
    async with client.stream("POST", url, json=body, headers=headers or {}) as r:
        if r.status_code != 200:
            await r.aread()
            if started is not None:
                started.set()
            return r.status_code, [r.json()]
        async for line in sse_lines(r):
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                if started is not None:
                    started.set()
    return 200, events


def stream_errors(events: list) -> list[dict]:
    return [e for e in events if isinstance(e, dict) and "error" in e]


def finish_reasons(events: list) -> list[str]:
    return [c["finish_reason"] for e in events if isinstance(e, dict) and "choices" in e
            for c in e["choices"] if c.get("finish_reason")]


def assert_stream_ended_with_error(events: list, code: str | None = None) -> dict:
    """The in-band error of a stream whose headers were already sent: an ``{"error": ...}``
    event, then ``data: [DONE]`` -- and no normal finish."""
    assert events and events[-1] == "[DONE]", events[-3:]
    errors = stream_errors(events)
    assert len(errors) == 1, events[-3:]
    assert events[-2] is errors[0], events[-3:]
    assert "length" not in finish_reasons(events)
    return assert_error_body(errors[0], code=code)


def assert_stream_completed(events: list, max_tokens: int) -> None:
    assert events and events[-1] == "[DONE]", events[-3:]
    assert not stream_errors(events), stream_errors(events)
    assert finish_reasons(events) == ["length"]
    usage = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    assert usage and usage[-1]["completion_tokens"] == max_tokens, usage


def engine_core_pid(server_pid: int) -> int:
    """The engine-core child of a server process (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        kids = [(p.pid, " ".join(p.cmdline())) for p in psutil.Process(server_pid).children()]
    else:
        kids = []
        for children in Path(f"/proc/{server_pid}/task").glob("*/children"):
            for pid in children.read_text().split():
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                kids.append((int(pid), cmd))
    cores = [pid for pid, cmd in kids if "fleetlm.engine.core_proc" in cmd]
    assert len(cores) == 1, kids
    return cores[0]


def raw_http(port: int, head: bytes, body_chunks: list[bytes] = (), timeout: float = 30.0) -> bytes:
    """Send a hand-written HTTP/1.1 request and return the whole response (server closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        for chunk in body_chunks:
            s.sendall(chunk)
        data = b""
        while True:
            try:
                got = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            if not got:
                break
            data += got
            if b"\r\n\r\n" in data:
                header, _, rest = data.partition(b"\r\n\r\n")
                m = re.search(rb"content-length:\s*(\d+)", header, re.I)
                if m and len(rest) >= int(m.group(1)):
                    break
        return data


def completion(prompt, max_tokens: int, **kw) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **kw}


def chat(content: str, max_tokens: int, **kw) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, **kw}


# -- 1. client disconnects abort the request; oversize bodies are refused ------------------------
class TestDisconnectAndBodyLimit:
    MAX_BODY = 65536

    @pytest.fixture(scope="class")
    def srv(self, model_dir):
        with ServerProcess(BASE + ["--max-request-body-bytes", str(self.MAX_BODY)], model=model_dir) as s:
            yield s

    def test_200_streams_closed_after_first_chunk_return_every_block(self, srv):
        start = start_free_blocks(srv)
        finished_before = metric(srv, "fleetlm:request_success_total")

        async def one(client: httpx.AsyncClient, i: int) -> dict:
            body = completion(f"Story number {i}: once upon a time", LONG, stream=True, temperature=0.8, seed=i)
            async with client.stream("POST", srv.url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in sse_lines(r):
                    if line.startswith("data: "):
                        return json.loads(line[len("data: "):])  # leaving the block closes the connection
            raise AssertionError("the stream ended before its first event")

        async def main() -> list[dict]:
            firsts = []
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=limits) as client:
                for batch in range(5):  # 5 x 40 = 200, each batch within --max-num-seqs (128)
                    firsts += await asyncio.gather(*(one(client, 40 * batch + i) for i in range(40)))
            return firsts

        firsts = asyncio.run(main())
        assert len(firsts) == 200
        assert all("choices" in f and "error" not in f for f in firsts)
        wait_idle(srv, start)
        # all of them were aborted: none ran to its (4000-token) end
        assert metric(srv, "fleetlm:request_success_total") == finished_before

    def test_multi_sequence_stream_disconnect_aborts_every_sequence(self, srv):
        """n=3 samples of 2 prompts: six engine sequences behind one HTTP stream."""
        start = start_free_blocks(srv)

        async def main():
            body = completion(["First prompt", "Second prompt"], LONG, stream=True, n=3, temperature=1.0, seed=1)
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
                async with client.stream("POST", srv.url + "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    seen = set()
                    async for line in sse_lines(r):
                        if line.startswith("data: "):
                            seen.add(json.loads(line[6:])["choices"][0]["index"])
                            if len(seen) >= 2:
                                break

        asyncio.run(main())
        wait_idle(srv, start)

    def test_nonstream_disconnect_before_completion_aborts(self, srv):
        start = start_free_blocks(srv)
        finished_before = metric(srv, "fleetlm:request_success_total")
        body = json.dumps(completion("A very long answer:", LONG, n=2, temperature=1.0, seed=3)).encode()
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(head + body)
            wait_for(lambda: metric(srv, RUNNING) >= 2, what="the request to be running")
        # the socket is closed: the handler must notice and abort both samples
        wait_idle(srv, start)
        assert metric(srv, "fleetlm:request_success_total") == finished_before

    @pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
    def test_oversize_body_with_content_length_is_413(self, srv, path):
        body = {"prompt": "word " * self.MAX_BODY, "max_tokens": 1} if path != "/v1/chat/completions" else \
            {"messages": [{"role": "user", "content": "word " * self.MAX_BODY}], "max_tokens": 1}
        data = json.dumps(body).encode()
        assert len(data) > self.MAX_BODY
        r = httpx.post(srv.url + path, content=data, headers={"content-type": "application/json"}, timeout=60)
        assert_error_response(r, 413, code="body_too_large")

    @pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
    def test_oversize_body_with_chunked_encoding_is_413(self, srv, path):
        """No Content-Length: the limit must hold while the body streams in.

        BUG (fails today): the middleware raises ``BodyTooLarge`` from its ``receive`` wrapper,
        but FastAPI reads the body inside ``try: ... except Exception`` and turns any exception
        into ``HTTPException(400, "There was an error parsing the body")``; the client gets
        ``400 {"detail": ...}`` instead of ``413`` with an OpenAI error body."""
        data = json.dumps({"prompt": "word " * self.MAX_BODY, "max_tokens": 1}).encode()

        def chunks():
            for i in range(0, len(data), 8192):
                yield data[i:i + 8192]

        r = httpx.post(srv.url + path, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert_error_response(r, 413, code="body_too_large")

    def test_small_chunked_body_is_accepted_and_server_keeps_serving(self, srv):
        data = json.dumps(completion("Hello there", 4)).encode()

        def chunks():
            for i in range(0, len(data), 7):
                yield data[i:i + 7]

        r = httpx.post(srv.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(srv.url + "/health", timeout=60).status_code == 200

    def test_invalid_content_length_is_refused(self, srv):
        raw = raw_http(srv.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 99999999999999999999\r\n\r\n{}")
        status = int(raw.split(b" ", 2)[1])
        assert 400 <= status < 500, raw[:300]
        assert httpx.get(srv.url + "/health", timeout=60).status_code == 200


# -- 2. a bounded queue answers 429, and everything it accepts completes --------------------------
class TestQueueOverflow:
    MAX_TOKENS = 48

    @pytest.fixture(scope="class")
    def srv(self, model_dir):
        args = BASE + ["--max-queued-requests", "4", "--max-num-seqs", "2", "--max-queued-tokens", "256"]
        with ServerProcess(args, model=model_dir) as s:
            yield s

    def test_burst_of_30_gets_429s_and_accepted_requests_complete(self, srv):
        start = start_free_blocks(srv)

        async def one(client: httpx.AsyncClient, i: int):
            if i % 3 == 2:  # a third of them stream
                body = completion(f"Request {i} says", self.MAX_TOKENS, stream=True,
                                  stream_options={"include_usage": True})
                return "stream", await read_stream(client, srv.url + "/v1/completions", body)
            r = await client.post(srv.url + "/v1/completions", json=completion(f"Request {i} says", self.MAX_TOKENS))
            return "full", r

        async def main():
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
                return await asyncio.gather(*(one(client, i) for i in range(30)))

        results = asyncio.run(main())
        accepted = rejected = 0
        for kind, res in results:
            if kind == "full":
                if res.status_code == 429:
                    rejected += 1
                    assert_error_response(res, 429, type_="rate_limit_error", code="queue_full")
                    assert int(res.headers["retry-after"]) >= 0
                else:
                    accepted += 1
                    assert res.status_code == 200, res.text
                    out = res.json()
                    assert out["choices"][0]["finish_reason"] == "length"
                    assert out["usage"]["completion_tokens"] == self.MAX_TOKENS
            else:
                status, events = res
                if status == 429:
                    rejected += 1
                    assert_error_body(events[0], type_="rate_limit_error", code="queue_full")
                else:
                    accepted += 1
                    assert status == 200
                    assert_stream_completed(events, self.MAX_TOKENS)
        assert rejected >= 1, "no request was refused: the queue bound did not apply"
        assert accepted >= 4, "the first four requests fit the bound and must be accepted"
        wait_idle(srv, start)
        # the accounting did not leak: an idle server takes requests again
        for i in range(6):
            r = httpx.post(srv.url + "/v1/completions", json=completion(f"After {i}", 4), timeout=CLIENT_TIMEOUT)
            assert r.status_code == 200, r.text

    def test_queued_token_bound_gives_429(self, srv):
        start = start_free_blocks(srv)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(100, 40000, 100).tolist() for _ in range(10)]

        async def main():
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
                return await asyncio.gather(*(client.post(srv.url + "/v1/completions", json=completion(p, 300))
                                              for p in prompts))

        results = asyncio.run(main())
        refused = [r for r in results if r.status_code == 429]
        assert refused, "ten 100-token prompts must overflow --max-queued-tokens 256"
        for r in refused:
            err = assert_error_response(r, 429, type_="rate_limit_error", code="queue_full")
            assert "retry-after" in r.headers
            assert "max-queued-tokens" in err["message"], err
        for r in results:
            if r.status_code != 429:
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 300
        wait_idle(srv, start)

    @pytest.mark.parametrize("case", ["prompt_over_token_bound", "n_over_sequence_bound", "batch_over_sequence_bound"])
    def test_request_that_can_never_be_queued_is_400_not_429(self, srv, case):
        """A request bigger than the queue bound itself can never be admitted, so "429, retry
        after 1 s" sends well-behaved clients into an endless retry loop.

        BUG (fails today): ``AsyncLLM._admit`` compares ``queued + request`` with the bound and
        raises ``QueueFullError`` even when the queue is empty ("0 of --max-queued-tokens 256")."""
        start_free_blocks(srv)
        body = {
            "prompt_over_token_bound": completion(list(range(100, 400)), 4),  # 300 prompt tokens > 256
            "n_over_sequence_bound": completion("Hello", 4, n=5, temperature=1.0),  # 5 sequences > 4
            "batch_over_sequence_bound": completion(["a", "b", "c", "d", "e"], 4),
        }[case]
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=CLIENT_TIMEOUT)
        assert_error_response(r, 400)


# -- 3. a request that crashes the model fails alone ------------------------------------------------
class TestPoisonedRequest:
    @pytest.fixture(scope="class")
    def fault_token(self, model_dir) -> int:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(" zebra").ids
        assert len(ids) == 1
        return ids[0]

    @pytest.fixture(scope="class")
    def srv(self, model_dir, fault_token):
        with ServerProcess(BASE, model=model_dir, env={"FLEETLM_FAULT_TOKEN_ID": str(fault_token)}) as s:
            yield s

    @pytest.fixture(scope="class")
    def good_prompts(self, fault_token) -> list[list[int]]:
        rng = np.random.default_rng(7)
        prompts = [rng.integers(100, 40000, int(rng.integers(3, 40))).tolist() for _ in range(6)]
        assert all(fault_token not in p for p in prompts)
        return prompts

    def test_poisoned_request_fails_alone(self, srv, fault_token, good_prompts):
        start = start_free_blocks(srv)
        failed_before = metric(srv, "fleetlm:engine_failed_steps_total")
        good = [completion(p, 64) for p in good_prompts]
        poisoned = completion([101, 102, fault_token, 103], 64)

        async def run(bodies_full, bodies_stream):
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
                full = [client.post(srv.url + "/v1/completions", json=b) for b in bodies_full]
                streams = [read_stream(client, srv.url + "/v1/completions", b) for b in bodies_stream]
                return await asyncio.gather(*full, *streams)

        reference = asyncio.run(run(good, []))
        assert all(r.status_code == 200 for r in reference), [r.text for r in reference]
        assert metric(srv, "fleetlm:engine_failed_steps_total") == failed_before
        expected = [r.json()["choices"][0]["text"] for r in reference]

        # the good requests first (so they are running), the poisoned ones right behind them
        *good_out, bad_full, (bad_status, bad_events) = asyncio.run(
            run(good + [poisoned], [poisoned | {"stream": True}]))
        assert_error_response(bad_full, 500, type_="internal_error", code="engine_error")
        assert bad_status == 200  # headers go out before the engine fails: the error is in-band
        assert_stream_ended_with_error(bad_events, code="engine_error")
        for r, want in zip(good_out, expected):
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["choices"][0]["finish_reason"] == "length"
            assert out["usage"]["completion_tokens"] == 64
            assert out["choices"][0]["text"] == want  # greedy: same tokens as without the poisoned one
        assert metric(srv, "fleetlm:engine_failed_steps_total") > failed_before
        # at least one failed step held good requests too, and they were retried one at a time
        retried = [int(n) for n in re.findall(r"retrying its (\d+) request", srv.log())]
        assert retried and max(retried) > 1, retried
        assert httpx.get(srv.url + "/health", timeout=60).status_code == 200
        wait_idle(srv, start)

    def test_poisoned_chat_request_fails_and_server_keeps_serving(self, srv, fault_token):
        start = start_free_blocks(srv)
        body = chat("Tell me about a zebra please", 16)
        tok = httpx.post(srv.url + "/tokenize", json={"messages": body["messages"]}, timeout=60).json()
        assert fault_token in tok["tokens"]
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT)
        assert_error_response(r, 500, type_="internal_error", code="engine_error")
        r = httpx.post(srv.url + "/v1/chat/completions", json=body | {"stream": True}, timeout=CLIENT_TIMEOUT)
        assert r.status_code == 200
        assert_stream_ended_with_error(parse_sse(r.text), code="engine_error")
        ok = httpx.post(srv.url + "/v1/chat/completions", json=chat("Tell me about a horse", 8), timeout=CLIENT_TIMEOUT)
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] == 8
        assert httpx.get(srv.url + "/health", timeout=60).status_code == 200
        wait_idle(srv, start)

    def test_poisoned_prompt_in_a_batch_fails_the_request_and_frees_its_siblings(self, srv, fault_token,
                                                                                  good_prompts):
        start = start_free_blocks(srv)
        body = completion([good_prompts[0], [5, fault_token, 6], good_prompts[1]], 200)
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=CLIENT_TIMEOUT)
        assert_error_response(r, 500, code="engine_error")
        r = httpx.post(srv.url + "/v1/completions", json=body | {"stream": True}, timeout=CLIENT_TIMEOUT)
        assert r.status_code == 200
        assert_stream_ended_with_error(parse_sse(r.text), code="engine_error")
        wait_idle(srv, start)


# -- 4. SIGTERM drains ----------------------------------------------------------------------------
async def _start_inflight(client, srv, n_streams: int, max_tokens: int, n_full: int = 1):
    """Start streaming and non-streaming requests; return once all are running in the engine."""
    started = [asyncio.Event() for _ in range(n_streams)]
    streams = [asyncio.create_task(read_stream(
        client, srv.url + "/v1/completions",
        completion(f"In flight {i}:", max_tokens, stream=True, stream_options={"include_usage": True}),
        started=started[i])) for i in range(n_streams)]
    fulls = [asyncio.create_task(client.post(srv.url + "/v1/completions", json=completion(f"Full {i}:", max_tokens)))
             for i in range(n_full)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
    await asyncio.to_thread(wait_for, lambda: metric(srv, RUNNING) >= n_streams + n_full, 60, 0.05,
                            "every request to be running")
    return streams, fulls


def test_sigterm_drains_inflight_requests_then_exits_0(model_dir):
    max_tokens = 1000
    with ServerProcess(BASE + ["--shutdown-timeout", "300"], model=model_dir) as srv:
        async def main():
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
                streams, fulls = await _start_inflight(client, srv, 3, max_tokens)
                srv.proc.send_signal(signal.SIGTERM)
                async with httpx.AsyncClient(timeout=30) as other:
                    deadline = time.monotonic() + 30
                    while (h := await other.get(srv.url + "/health/ready")).status_code != 503:
                        assert time.monotonic() < deadline, "/health/ready never turned 503 after SIGTERM"
                        await asyncio.sleep(0.02)
                    assert "shutting down" in h.json()["status"]
                    live = await other.get(srv.url + "/health")  # draining is still alive: no restart
                    assert live.status_code == 200 and live.json() == {"status": "draining"}, live.text
                    assert not any(t.done() for t in streams + fulls), "in-flight requests ended early"
                    for method, path, body in [("POST", "/v1/completions", completion("new", 2)),
                                               ("POST", "/v1/chat/completions", chat("new", 2)),
                                               ("GET", "/v1/models", None)]:
                        r = await other.request(method, srv.url + path, json=body)
                        assert_error_response(r, 503, code="draining")
                        assert "retry-after" in r.headers
                    assert (await other.get(srv.url + "/metrics")).status_code == 200
                stream_results = await asyncio.gather(*streams)
                full_results = await asyncio.gather(*fulls)
            for status, events in stream_results:
                assert status == 200
                assert_stream_completed(events, max_tokens)
            for r in full_results:
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == max_tokens
                assert r.json()["choices"][0]["finish_reason"] == "length"

        asyncio.run(main())
        assert srv.proc.wait(120) == 0
        assert "shutdown timeout" not in srv.log()


def test_sigterm_with_short_shutdown_timeout_aborts_inflight_and_exits_0(model_dir):
    with ServerProcess(BASE + ["--shutdown-timeout", "1"], model=model_dir) as srv:
        async def main():
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
                streams, fulls = await _start_inflight(client, srv, 2, LONG)
                srv.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*streams), await asyncio.gather(*fulls)

        stream_results, full_results = asyncio.run(main())
        for status, events in stream_results:
            assert status == 200
            assert_stream_ended_with_error(events)
        for r in full_results:
            err = assert_error_response(r, 503)
            assert "shut down" in err["message"], err
        assert srv.proc.wait(120) == 0
        assert "shutdown timeout: aborting 3 request(s)" in srv.log()


# -- 5. the engine process dies --------------------------------------------------------------------
def test_engine_core_death_gives_503_and_ends_inflight_requests(model_dir):
    with ServerProcess(BASE, model=model_dir) as srv:
        core = engine_core_pid(srv.proc.pid)

        async def main():
            async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
                streams, fulls = await _start_inflight(client, srv, 1, LONG)
                os.kill(core, signal.SIGKILL)
                (status, events), = await asyncio.gather(*streams)
                full, = await asyncio.gather(*fulls)
            assert status == 200
            assert_stream_ended_with_error(events, code="engine_dead")
            assert_error_response(full, 503, code="engine_dead")

        asyncio.run(main())
        with httpx.Client(timeout=30) as c:  # a hang would be a client timeout here
            for method, path, body in [("POST", "/v1/completions", completion("hello", 2)),
                                       ("POST", "/v1/completions", completion("hello", 2, stream=True)),
                                       ("POST", "/v1/chat/completions", chat("hello", 2)),
                                       ("GET", "/v1/models", None)]:
                assert_error_response(c.request(method, srv.url + path, json=body), 503, code="engine_dead")
            h = c.get(srv.url + "/health")
            assert h.status_code == 503
            assert "engine" in h.json()["status"]
            assert c.get(srv.url + "/metrics").status_code == 200
        assert srv.proc.poll() is None  # the front end stays up and says why it cannot serve
        assert srv.terminate(60) == 0


# -- 6. API keys -----------------------------------------------------------------------------------
ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", completion("Hi", 2)),
    ("POST", "/v1/chat/completions", chat("Hi", 2)),
    ("POST", "/tokenize", {"prompt": "Hi"}),
    ("POST", "/detokenize", {"tokens": [1, 2, 3]}),
    ("GET", "/metrics", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
    ("GET", "/version", None),
]
ROUTE_IDS = [f"{m} {p}" for m, p, _ in ROUTES]
BAD_AUTH = [None, "", "Bearer", "Bearer wrong", "Bearer k1x", "Bearer k", "Basic k1", "k1", "Token k1"]


def _assert_401(r: httpx.Response) -> None:
    assert_error_response(r, 401, type_="authentication_error", code="invalid_api_key")
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")


class TestApiKeys:
    KEYS = ["k1", "k2", "k3", "k4", "k5", "k6"]

    @pytest.fixture(scope="class")
    def srv(self, model_dir, tmp_path_factory):
        key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
        key_file.write_text("k5\n\n   k6  \n")
        args = BASE + ["--api-key", "k1", "--api-key", "k2", "--api-key-file", str(key_file), "--enable-docs"]
        with ServerProcess(args, model=model_dir, env={"FLEETLM_API_KEY": "k3, k4"}, api_key="k1") as s:
            yield s

    @pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
    def test_every_route_but_health_needs_a_valid_key(self, srv, method, path, body):
        """(The docs routes are on here: ``--enable-docs``; they are off by default.)"""
        with httpx.Client(timeout=CLIENT_TIMEOUT) as c:
            for auth in BAD_AUTH:
                headers = {} if auth is None else {"Authorization": auth}
                _assert_401(c.request(method, srv.url + path, json=body, headers=headers))
            for key in self.KEYS:  # --api-key (twice), $FLEETLM_API_KEY (comma-separated), --api-key-file
                r = c.request(method, srv.url + path, json=body, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, (key, r.text[:300])

    @pytest.mark.parametrize("path", ["/health", "/health/ready"])
    def test_health_probes_are_open(self, srv, path):
        assert httpx.get(srv.url + path, timeout=60).status_code == 200
        assert httpx.get(srv.url + path, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 200

    def test_unknown_route_is_401_without_a_key(self, srv):
        _assert_401(httpx.get(srv.url + "/v1/secret-route", timeout=60))

    def test_openai_client(self, srv):
        import openai

        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="k4", max_retries=0, timeout=CLIENT_TIMEOUT)
        assert [m.id for m in ok.models.list()] == [MODEL_NAME]
        out = ok.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2, temperature=0)
        assert out.usage.completion_tokens == 2
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0, timeout=CLIENT_TIMEOUT)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


class TestMetricsPublic:
    @pytest.fixture(scope="class")
    def srv(self, model_dir):
        with ServerProcess(BASE + ["--metrics-public", "--enable-docs"], model=model_dir, env={"FLEETLM_API_KEY": "only-key"},
                           api_key="only-key") as s:
            yield s

    def test_metrics_open_rest_closed(self, srv):
        with httpx.Client(timeout=CLIENT_TIMEOUT) as c:
            r = c.get(srv.url + "/metrics")
            assert r.status_code == 200 and "fleetlm:kv_cache_free_blocks" in r.text
            assert c.get(srv.url + "/health").status_code == 200
            for method, path, body in ROUTES:
                if path == "/metrics":
                    continue
                _assert_401(c.request(method, srv.url + path, json=body))
                _assert_401(c.request(method, srv.url + path, json=body, headers={"Authorization": "Bearer k1"}))
                r = c.request(method, srv.url + path, json=body, headers=srv.headers)
                assert r.status_code == 200, (path, r.text[:300])


# -- 8. per-request timeout --------------------------------------------------------------------------
class TestRequestTimeout:
    @pytest.fixture(scope="class")
    def srv(self, model_dir):
        with ServerProcess(BASE + ["--request-timeout", "1"], model=model_dir) as s:
            yield s

    def test_long_request_times_out_with_504_and_frees_its_blocks(self, srv):
        start = start_free_blocks(srv)
        r = httpx.post(srv.url + "/v1/completions", json=completion("Go on and on:", LONG, n=2, temperature=1.0),
                       timeout=CLIENT_TIMEOUT)
        assert_error_response(r, 504, type_="timeout_error", code="request_timeout")
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat("Go on and on", LONG), timeout=CLIENT_TIMEOUT)
        assert_error_response(r, 504, type_="timeout_error", code="request_timeout")
        wait_idle(srv, start)

    @pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
    def test_long_stream_times_out_in_band_and_frees_its_blocks(self, srv, path):
        start = start_free_blocks(srv)
        body = (completion("Go on and on:", LONG, stream=True) if path == "/v1/completions"
                else chat("Go on and on", LONG, stream=True))
        r = httpx.post(srv.url + path, json=body, timeout=CLIENT_TIMEOUT)
        assert r.status_code == 200
        events = parse_sse(r.text)
        err = assert_stream_ended_with_error(events, code="request_timeout")
        assert err["type"] == "timeout_error"
        wait_idle(srv, start)

    def test_short_requests_are_unaffected(self, srv):
        r = httpx.post(srv.url + "/v1/completions", json=completion("Short", 4), timeout=CLIENT_TIMEOUT)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(srv.url + "/health", timeout=60).status_code == 200
