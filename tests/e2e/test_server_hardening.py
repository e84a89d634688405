"""``fleetlm serve`` against the defects an outside attack found (issue 18), end to end.

Real server processes on a tiny random-weight model. Every check is about behaviour (status
codes, error bodies, what the log holds, whether a connection was closed), never about speed:
where time matters, the server's limit is short and the client waits far longer.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow

MODEL_NAME = "tiny"
BASE = ["--dtype", "float32", "--kv-cache-memory", "32MiB", "--num-threads", "1", "--served-model-name", MODEL_NAME]
RUNNING, WAITING = "fleetlm:num_requests_running", "fleetlm:num_requests_waiting"
CHAT = [{"role": "user", "content": "hi"}]
LONG = 4000  # tokens: a request that is still running when the test looks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.helpers import make_tiny_hf_dir

    return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny_hardening"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def srv(model_dir):
    with ServerProcess(BASE, model=model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c


def error_of(r: httpx.Response, status: int = 400) -> dict:
    """The OpenAI error object of ``r``, checking its shape."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def raw_exchange(url: str, data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes on a fresh connection; everything the server sends until it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


# -- 1-4, 6, 7: errors name the field the client sent -------------------------------------------
def test_flat_token_id_prompt_is_one_prompt(client):
    r = client.post("/v1/completions", json={"prompt": [1000] * 1100, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["usage"]["prompt_tokens"] == 1100
    r = client.post("/v1/completions", json={"prompt": [1000] * 300, "max_tokens": 1, "n": 4})
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    r = client.post("/v1/completions", json={"prompt": [[1000, 1001]] * 600, "max_tokens": 1, "n": 2})
    assert error_of(r)["param"] == "prompt"  # a real batch still counts prompts x n


@pytest.mark.parametrize("top_logprobs", [21, -1])
def test_top_logprobs_errors_name_top_logprobs(client, top_logprobs):
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "logprobs": True, "top_logprobs": top_logprobs})
    err = error_of(r)
    assert err["param"] == "top_logprobs" and err["message"].startswith("top_logprobs "), err


@pytest.mark.parametrize(("body", "param"), [
    ({"max_completion_tokens": -5}, "max_completion_tokens"),
    ({"max_completion_tokens": 5000}, "max_completion_tokens"),  # prompt + it over max_model_len
    ({"max_completion_tokens": 5000, "max_tokens": 2}, "max_completion_tokens"),
    ({"max_completion_tokens": 5, "min_tokens": 6}, "min_tokens"),
])
def test_max_completion_tokens_errors_name_it(client, body, param):
    err = error_of(client.post("/v1/chat/completions", json={"messages": CHAT, **body}))
    assert err["param"] == param, err
    assert "max_completion_tokens" in err["message"] and "max_tokens" not in err["message"].replace(
        "max_completion_tokens", ""), err


@pytest.mark.parametrize(("stop", "param"), [(["ok", "\udfff"], "stop[1]"), ("\ud800", "stop")])
def test_lone_surrogate_in_stop_names_the_stop_string(client, stop, param):
    body = json.dumps({"prompt": "hi", "max_tokens": 2, "stop": stop})  # \u-escaped surrogates
    err = error_of(client.post("/v1/completions", content=body, headers={"content-type": "application/json"}))
    assert err["param"] == param, err
    assert "surrogate" in err["message"]
    assert not any(w in err["message"] for w in ("codec", "utf-8", "engine")), err


@pytest.mark.parametrize("content", [b'{"prompt": "hi", "max_tokens": 1', b"nope", b'{"prompt": "hi",}'])
def test_json_parse_errors_have_no_param(client, content):
    err = error_of(client.post("/v1/completions", content=content, headers={"content-type": "application/json"}))
    assert err["param"] is None and err["code"] == "invalid_json", err
    assert "not valid JSON" in err["message"] and "at character" in err["message"], err


def test_message_name_is_never_silently_dropped(client):
    """SmolLM2's template ignores ``name``: the request is refused, naming the field."""
    named = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "ann"}]
    err = error_of(client.post("/v1/chat/completions", json={"messages": named, "max_tokens": 2}))
    assert err["param"] == "messages[1].name", err
    err = error_of(client.post("/tokenize", json={"messages": named}))
    assert err["param"] == "messages[1].name", err


# -- bounds on stop strings and stop token ids ---------------------------------------------------
@pytest.mark.parametrize(("extra", "param"), [
    ({"stop": [f"s{i}" for i in range(65)]}, "stop"),
    ({"stop": ["ok", "x" * 257]}, "stop[1]"),
    ({"stop_token_ids": list(range(257))}, "stop_token_ids"),
    ({"stop_token_ids": [5, 49152]}, "stop_token_ids[1]"),
])
def test_stop_lists_are_bounded(client, extra, param):
    err = error_of(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **extra}))
    assert err["param"] == param, err


def test_stop_lists_at_the_bound_are_served(client):
    text = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "temperature": 0,
                                                "ignore_eos": True}).json()["choices"][0]["text"]
    stops = [f"zz{i}" for i in range(63)] + [text[2:4]]
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                             "stop": stops, "stop_token_ids": list(range(1000, 1256))})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["stop_reason"] == text[2:4] and choice["text"] == text[:text.index(text[2:4])], (choice, text)


# -- 5: broken framing -------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/completions", "/health"])
def test_broken_chunked_framing_gets_an_openai_error_and_no_traceback(srv, path):
    before = srv.log().count("Invalid HTTP request")
    for _ in range(3):
        out = raw_exchange(srv.url, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    "Transfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n".encode())
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), out[:300]
        assert json.loads(body)["error"]["code"] == "invalid_http", body
    time.sleep(0.5)  # let any handler of those requests finish (and log, if it were to)
    log = srv.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert log.count("Invalid HTTP request") - before <= 3  # one line per request at most
    assert httpx.get(srv.url + "/health", timeout=60).status_code == 200


# -- routes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_are_off_by_default(client, path):
    assert error_of(client.get(path), 404)["type"] == "not_found_error"


def test_version_and_both_probes(client):
    from fleetlm import __version__

    assert client.get("/version").json() == {"version": __version__}
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/health/ready").json() == {"status": "ok"}


# -- liveness vs readiness under load ----------------------------------------------------------------
def metric(srv: ServerProcess, name: str) -> float:
    try:
        return srv.metric(name)
    except KeyError:
        return 0.0


def test_liveness_answers_behind_a_full_queue_and_readiness_says_full(model_dir):
    """One sequence runs, one waits (the queue bound is 1): /health must answer while both are
    still in flight (the old probe generated a token, so it waited behind them), and
    /health/ready says the queue is full."""
    args = BASE + ["--max-num-seqs", "1", "--max-queued-requests", "1"]
    with ServerProcess(args, model=model_dir) as busy:
        async def until(running: int, waiting: int) -> None:
            deadline = time.monotonic() + 60
            while await asyncio.to_thread(lambda: (metric(busy, RUNNING), metric(busy, WAITING))) != (running, waiting):
                assert time.monotonic() < deadline, f"never {running} running and {waiting} waiting"
                await asyncio.sleep(0.05)

        async def main():
            async with httpx.AsyncClient(base_url=busy.url, timeout=300) as c:
                body = {"prompt": "go", "max_tokens": LONG, "ignore_eos": True, "stream": True}
                tasks = [asyncio.create_task(c.post("/v1/completions", json=body))]
                await until(1, 0)
                tasks.append(asyncio.create_task(c.post("/v1/completions", json=body)))
                await until(1, 1)
                async with httpx.AsyncClient(base_url=busy.url, timeout=300) as probe:
                    live = await probe.get("/health")
                    ready = await probe.get("/health/ready")
                in_flight = not any(t.done() for t in tasks)
                for t in tasks:
                    t.cancel()
                return live, ready, in_flight

        live, ready, in_flight = asyncio.run(main())
        assert in_flight, "the probes only answered after the queued work finished"
        assert live.status_code == 200 and live.json() == {"status": "ok"}, live.text
        assert ready.status_code == 503 and "queue is full" in ready.json()["status"], ready.text


# -- idle connections and the connection limit -------------------------------------------------------
@pytest.fixture(scope="module")
def idle_srv(model_dir):
    with ServerProcess(BASE + ["--timeout-keep-alive", "1"], model=model_dir) as s:
        yield s


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_idle_connection_is_closed(idle_srv):
    host, port = idle_srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        assert closed_by_server(s)  # a client-side timeout (30 s) would raise instead


def test_slow_loris_gets_no_more_time_for_sending_slowly(idle_srv):
    host, port = idle_srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(0.2)
        for _ in range(150):  # 30 s of trickling, one header byte every 0.2 s
            try:
                s.sendall(b"X")
                if s.recv(65536) == b"":
                    return
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                return
        pytest.fail("a connection trickling its headers was kept open for 30 s")


def test_keep_alive_connection_is_closed_after_a_response_but_long_requests_finish(idle_srv):
    host, port = idle_srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        assert closed_by_server(s)
    # a request that takes longer than the idle timeout to answer is not cut
    r = httpx.post(idle_srv.url + "/v1/completions", timeout=300,
                   json={"prompt": "go", "max_tokens": 1500, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1500


def test_connections_past_the_limit_get_503(model_dir):
    with ServerProcess(BASE + ["--max-connections", "3", "--timeout-keep-alive", "120"], model=model_dir) as lim:
        host, port = lim.url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(3)]
        try:
            time.sleep(0.3)  # the server has accepted them
            r = httpx.get(lim.url + "/v1/models", timeout=60)
            err = error_of(r, 503)
            assert err["code"] == "too_many_connections" and r.headers["connection"] == "close", (err, r.headers)
            assert httpx.get(lim.url + "/health", timeout=60).status_code == 200  # probes are exempt
            ready = httpx.get(lim.url + "/health/ready", timeout=60)
            assert ready.status_code == 503 and "connection limit" in ready.json()["status"]
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 30
        while httpx.get(lim.url + "/v1/models", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "still refused after the other connections closed"
            time.sleep(0.1)
