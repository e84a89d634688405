"""``fleetlm router`` over real ``fleetlm serve`` replicas of a tiny random model.

Two replicas start once for the module (each with KV events on an ipc endpoint); each test
starts its own router process in front of them. Outputs through the router must equal a
replica's own; prefix routing must put each shared-prefix group where its blocks are (hits read
from the replicas' /metrics); least_load must spread a uniform load within 10%.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.server_utils import ServerProcess, free_port

SERVE = ["--dtype", "float32", "--kv-cache-memory", "32MiB", "--num-threads", "1", "--served-model-name", "tiny"]
HITS, SUCCESS = "fleetlm:prefix_cache_hits_total", "fleetlm:request_success_total"
TIMEOUT = 120.0


class RouterProcess:
    """``with RouterProcess(workers, ["--policy", "prefix"]) as r: httpx.post(r.url + ...)``."""

    def __init__(self, workers: list[str], args: list[str], start_timeout: float = 60) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        wargs = [a for w in workers for a in ("--worker", w)]
        self.cmd = [sys.executable, "-m", "fleetlm.entrypoints.cli", "router", "--port", str(self.port),
                    "--health-interval", "0.3", *wargs, *args]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RouterProcess:
        self.log = tempfile.NamedTemporaryFile(prefix="fleetlm-router-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited {self.proc.returncode}: {self.text()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(self.text())

    def text(self) -> str:
        return Path(self.log.name).read_text()

    def metric(self, name: str, **labels: str) -> float:
        return metric_of(self.url, name, **labels)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self.log.name)


def metric_of(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_replica(model_dir: Path, events: str | None = None, port: int | None = None) -> ServerProcess:
    args = [*SERVE, *(["--kv-events-endpoint", events] if events else [])]
    srv = ServerProcess(args, model=model_dir)
    if port is not None:
        srv.port, srv.url = port, f"http://127.0.0.1:{port}"
        srv.cmd[srv.cmd.index("--port") + 1] = str(port)
    return srv.__enter__()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tests.helpers import make_tiny_hf_dir

    return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny_router"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def replicas(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("kv_events")
    reps, specs = [], []
    try:
        for i in range(2):
            ep = f"ipc://{d}/r{i}"
            reps.append(start_replica(model_dir, ep))
            specs.append(f"{reps[-1].url},{ep}")
        yield reps, specs
    finally:
        for r in reps:
            r.__exit__(None, None, None)


def complete(url: str, prompt: str, max_tokens: int = 8, stream: bool = False, **extra) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}
    if not stream:
        r = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_outputs_through_the_router_equal_a_replicas_own(replicas):
    reps, specs = replicas
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
    with RouterProcess(specs, ["--policy", "round_robin"]) as router:
        for p in prompts:
            direct = complete(reps[0].url, p, 12)
            assert complete(router.url, p, 12) == direct
            assert complete(router.url, p, 12, stream=True) == direct
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
        a = httpx.post(reps[1].url + "/v1/chat/completions", json=chat, timeout=TIMEOUT).json()
        b = httpx.post(router.url + "/v1/chat/completions", json=chat, timeout=TIMEOUT).json()
        assert a["choices"][0]["message"] == b["choices"][0]["message"]
        assert httpx.get(router.url + "/v1/models", timeout=30).json()["data"][0]["id"] == "tiny"
        assert router.metric("fleetlm_router:requests_total", outcome="ok") == 2 * len(prompts) + 1


@pytest.mark.parametrize("mode", ["approximate", "precise"])
def test_prefix_routing_sends_each_group_to_the_replica_that_holds_it(replicas, model_dir, mode):
    reps, specs = replicas
    groups, per_group = 4, 4
    tag = uuid.uuid4().hex  # fresh prefixes: earlier tests' blocks must not count
    prefixes = [f"{tag} group {g}: " + " ".join(f"w{g}x{i}" for i in range(100)) for g in range(groups)]
    extra = ["--model", str(model_dir)] if mode == "precise" else []
    with RouterProcess(specs, ["--policy", "prefix", "--prefix-mode", mode, *extra]) as router:
        with httpx.Client() as c:
            shared = len(c.post(reps[0].url + "/tokenize", json={"prompt": prefixes[0]}).json()["tokens"])
        before = sum(metric_of(r.url, HITS) for r in reps)
        for q in range(per_group):  # one round at a time, so the holder has stored the prefix
            for p in prefixes:
                complete(router.url, p + f" question {q}?", 2)
            time.sleep(0.3 if mode == "precise" else 0)  # KV events cross a socket
        hits = sum(metric_of(r.url, HITS) for r in reps) - before
        ideal = groups * (per_group - 1) * (shared // 16) * 16  # every later prompt hits its group's full blocks
        assert hits >= 0.9 * ideal, (hits, ideal)
        assert router.metric("fleetlm_router:policy_decisions_total", reason="prefix_hit") >= groups * (per_group - 1)


def test_least_load_spreads_a_uniform_load_within_ten_percent(replicas):
    reps, specs = replicas
    n = 40
    with RouterProcess(specs, ["--policy", "least_load"]) as router:
        before = [metric_of(r.url, SUCCESS) for r in reps]

        async def burst():
            async with httpx.AsyncClient(timeout=TIMEOUT) as c:
                body = {"model": "tiny", "prompt": "the same length prompt", "max_tokens": 16, "temperature": 0}
                rs = await asyncio.gather(*(c.post(router.url + "/v1/completions", json=body) for _ in range(n)))
                assert all(r.status_code == 200 for r in rs)

        asyncio.run(burst())
        counts = [metric_of(r.url, SUCCESS) - b for r, b in zip(reps, before)]
        assert sum(counts) == n
        assert abs(counts[0] - counts[1]) <= 0.1 * n, counts


def test_session_policy_is_sticky_by_header_and_user(replicas):
    reps, specs = replicas
    with RouterProcess(specs, ["--policy", "session"]) as router:
        for who in ({"user": "alice"}, {"user": "bob"}, {"header": "s-1"}, {"header": "s-2"}):
            before = [metric_of(r.url, SUCCESS) for r in reps]
            for _ in range(4):
                body = {"model": "tiny", "prompt": "hello", "max_tokens": 2, **({"user": who["user"]} if "user" in who else {})}
                headers = {"x-session-id": who["header"]} if "header" in who else {}
                assert httpx.post(router.url + "/v1/completions", json=body, headers=headers,
                                  timeout=TIMEOUT).status_code == 200
            counts = sorted(metric_of(r.url, SUCCESS) - b for r, b in zip(reps, before))
            assert counts == [0, 4], (who, counts)


def test_client_disconnect_aborts_the_request_on_its_replica(replicas):
    reps, specs = replicas
    with RouterProcess(specs[:1], ["--policy", "round_robin"]) as router:
        body = {"model": "tiny", "prompt": "tell me a very long story", "max_tokens": 3000, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # first token seen: now walk away
        total = reps[0].metric("fleetlm:kv_cache_free_blocks") + 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if reps[0].metric("fleetlm:num_requests_running") == 0:
                break
            time.sleep(0.2)
        assert reps[0].metric("fleetlm:num_requests_running") == 0
        assert reps[0].metric("fleetlm:kv_cache_usage_perc") == 0.0, total
        assert router.metric("fleetlm_router:client_disconnects_total") >= 1
