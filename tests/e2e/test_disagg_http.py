"""Disaggregated serving over HTTP on a tiny random Llama (fp32): one prefill worker, two decode
workers and ``fleetlm router --pd``. Greedy text (completions and chat) through the router equals
one co-located server's;
unknown handles are a 404 naming them; a bad ``--kv-transfer-config`` exits 2; 200 requests with random client
disconnects (before and after the first token) and a killed decode worker leave every request
with a response or an error and every block back in the pool on the live workers."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import make_tiny_hf_dir
from tests.server_utils import ServerProcess, free_port

pytestmark = pytest.mark.slow
COMMON = ["--dtype", "float32", "--kv-cache-memory", "4194304"]
PROMPTS = ["The quick brown fox jumps over the lazy dog and then", "Once upon a time", "1, 2, 3, 4, 5, 6, 7, 8",
           "A long prompt " * 12]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny_pd"), initializer_range=0.2)


def role(cfg: dict) -> list[str]:
    return COMMON + ["--kv-transfer-config", json.dumps(cfg)]


@pytest.fixture(scope="module")
def fleet(tiny):
    addr = f"127.0.0.1:{free_port()}"
    prod = ServerProcess(role({"role": "producer", "transport": "tcp", "address": addr, "handle_ttl_s": 5}), model=tiny)
    decs = [ServerProcess(role({"role": "consumer", "transport": "tcp", "producers": [addr]}), model=tiny)
            for _ in range(2)]
    ref = ServerProcess(COMMON, model=tiny)
    servers = [prod, *decs, ref]
    for s in servers:
        s.__enter__()
    port = free_port()
    cmd = [sys.executable, "-m", "fleetlm.entrypoints.cli", "router", "--pd", "--port", str(port), "--prefill", prod.url,
           "--health-interval", "0.3", *sum((["--decode", d.url] for d in decs), [])]
    router = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health/ready").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield {"router": url, "prod": prod, "decs": decs, "ref": ref, "addr": addr}
    router.terminate()
    router.wait(10)
    for s in servers:
        s.__exit__(None, None, None)


def body(prompt: str, **kw) -> dict:
    return {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **kw}


def test_greedy_text_through_the_pd_router_equals_colocated(fleet):
    for p in PROMPTS:
        want = httpx.post(fleet["ref"].url + "/v1/completions", json=body(p), timeout=60).json()
        got = httpx.post(fleet["router"] + "/v1/completions", json=body(p), timeout=60).json()
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        assert got["usage"] == want["usage"]
        text = ""
        with httpx.stream("POST", fleet["router"] + "/v1/completions", json=body(p, stream=True), timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        assert text == want["choices"][0]["text"]


def test_greedy_chat_through_the_pd_router_equals_colocated(fleet):
    """Chat: the decode worker renders the same conversation; the router joins the first token's
    content with the rest (JSON and SSE deltas); usage counts every token once."""
    for p in PROMPTS[:3]:
        req = {"messages": [{"role": "user", "content": p}], "max_completion_tokens": 10, "temperature": 0,
               "ignore_eos": True, "logprobs": True}
        want = httpx.post(fleet["ref"].url + "/v1/chat/completions", json=req, timeout=60).json()
        got = httpx.post(fleet["router"] + "/v1/chat/completions", json=req, timeout=60).json()
        assert got["object"] == "chat.completion"
        assert got["choices"][0]["message"] == want["choices"][0]["message"]
        assert got["choices"][0]["logprobs"]["content"] == want["choices"][0]["logprobs"]["content"]
        assert got["usage"] == want["usage"] and got["choices"][0]["finish_reason"] == "length"
        text, roles = "", set()
        with httpx.stream("POST", fleet["router"] + "/v1/chat/completions", json={**req, "stream": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    text += delta.get("content") or ""
                    roles.add(delta.get("role"))
        assert text == want["choices"][0]["message"]["content"] and "assistant" in roles
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = httpx.post(fleet["router"] + "/v1/chat/completions", json={**req, "tools": tools}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    r = httpx.post(fleet["prod"].url + "/v1/chat/completions",
                   json={**req, "kv_transfer_params": {"do_remote_decode": True}}, timeout=30)
    assert r.status_code == 400 and "max_tokens = 1" in r.json()["error"]["message"]
    r = httpx.post(fleet["decs"][0].url + "/v1/chat/completions", json={**req, "kv_transfer_params": {
        "remote_address": fleet["addr"], "transfer_id": "chatcmpl-nope"}}, timeout=30)
    assert r.status_code == 404 and "chatcmpl-nope" in r.json()["error"]["message"]


def test_unknown_handle_is_a_404_naming_it_and_bad_params_a_400(fleet):
    d = fleet["decs"][0]
    r = httpx.post(d.url + "/v1/completions", json=body(PROMPTS[0], kv_transfer_params={
        "remote_address": fleet["addr"], "transfer_id": "cmpl-nope-0"}), timeout=30)
    assert r.status_code == 404 and "cmpl-nope-0" in r.json()["error"]["message"]
    r = httpx.post(d.url + "/v1/completions", json=body(PROMPTS[0], kv_transfer_params={
        "remote_address": "10.1.2.3:9", "transfer_id": "x"}), timeout=30)
    assert r.status_code == 400 and "producers" in r.json()["error"]["message"]
    r = httpx.post(fleet["prod"].url + "/v1/completions",
                   json=body(PROMPTS[0], kv_transfer_params={"do_remote_decode": True}), timeout=30)
    assert r.status_code == 400 and "max_tokens = 1" in r.json()["error"]["message"]
    r = httpx.post(fleet["ref"].url + "/v1/completions",
                   json=body(PROMPTS[0], kv_transfer_params={"do_remote_decode": True}), timeout=30)
    assert r.status_code == 400 and "--kv-transfer-config" in r.json()["error"]["message"]


@pytest.mark.parametrize("cfg, needle", [
    ('{"role": "consumer"}', "consumer without a producer"),
    ('{"role": "producer", "address": "127.0.0.1:1", "transport": "smoke-signals"}', "smoke-signals"),
])
def test_bad_kv_transfer_config_exits_2(tiny, cfg, needle):
    out = subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", "serve", str(tiny), "--kv-transfer-config",
                          cfg], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and needle in out.stderr + out.stdout


def test_disconnects_and_a_dead_decode_worker_leave_no_block_held(fleet):
    rng = random.Random(0)
    live = [fleet["prod"], *fleet["decs"]]
    start = {s.url: s.metric("fleetlm:kv_cache_free_blocks") for s in live}

    async def one(client: httpx.AsyncClient, i: int) -> str:
        kw = {"stream": bool(i % 2)}
        try:
            if rng.random() < 0.3:  # leave early: before or after the first token
                await asyncio.wait_for(client.post("/v1/completions", json=body(PROMPTS[i % 4] + str(i), **kw)),
                                       timeout=rng.uniform(0.01, 0.5))
                return "done"
            r = await client.post("/v1/completions", json=body(PROMPTS[i % 4] + str(i), **kw))
            return "ok" if r.status_code == 200 else f"error {r.status_code}"
        except (TimeoutError, httpx.HTTPError):
            return "left"

    async def run(n: int, kill_at: int | None = None):
        async with httpx.AsyncClient(base_url=fleet["router"], timeout=60) as c:
            tasks = []
            for i in range(n):
                tasks.append(asyncio.create_task(one(c, i)))
                if i == kill_at:
                    fleet["decs"][1].proc.kill()
                await asyncio.sleep(0.02)
            return await asyncio.gather(*tasks)

    results = asyncio.run(run(200, kill_at=100))
    assert len(results) == 200 and all(r in ("ok", "left", "done") or r.startswith("error") for r in results)
    after = asyncio.run(run(8))  # the router now serves on the live decode worker
    assert after.count("ok") >= 6
    survivors = [fleet["prod"], fleet["decs"][0]]
    deadline = time.time() + 30
    while time.time() < deadline:
        if all(s.metric("fleetlm:kv_cache_free_blocks") == start[s.url] for s in survivors):
            break
        time.sleep(0.5)
    assert [s.metric("fleetlm:kv_cache_free_blocks") for s in survivors] == [start[s.url] for s in survivors]
