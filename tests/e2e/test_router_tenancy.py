"""``fleetlm router --tenants`` over a real ``fleetlm serve --tenants`` replica (issue 15), tiny
random model: the precise prefix index finds a tenant's blocks for that tenant only (and the
shared prefix for every tenant that opted in), the router's own buckets refuse with 429, streamed
output is counted from the replica's usage, and no key reaches the router's log or metrics."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.e2e.test_router import RouterProcess
from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow

KEYS = {"alice": "sk-alice-SECRET-r1", "bob": "sk-bob-SECRET-r2", "quota": "sk-quota-SECRET-r3",
        "tokens": "sk-tokens-SECRET-r4"}
ADMIN = "sk-admin-SECRET-r0"
PUBLIC = "You are the assistant of the harbour office. Answer in one sentence and name the berth. " * 3
TENANTS = f"""\
[tenants.alice]
api_keys = ["{KEYS['alice']}"]
shared_prefixes = ["pub"]

[tenants.bob]
api_keys = ["{KEYS['bob']}"]
shared_prefixes = ["pub"]

[tenants.quota]
api_keys = ["{KEYS['quota']}"]
requests_per_minute = 3

[tenants.tokens]
api_keys = ["{KEYS['tokens']}"]
tokens_per_minute = 100

[shared_prefixes.pub]
text = "{PUBLIC}"
"""


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("router_tenants")
    f = d / "tenants.toml"
    f.write_text(TENANTS)
    ep = f"ipc://{d}/kv"
    rep = ServerProcess(["--dtype", "float32", "--kv-cache-memory", "32MiB", "--num-threads", "1",
                         "--tenants", str(f), "--api-key", ADMIN, "--kv-events-endpoint", ep],
                        model=tiny_model_dir, api_key=ADMIN)
    with rep, RouterProcess([f"{rep.url},{ep}"], ["--policy", "prefix", "--prefix-mode", "precise", "--model",
                                                  str(tiny_model_dir), "--tenants", str(f), "--api-key", ADMIN,
                                                  "--cache-threshold", "0.2"]) as router:
        yield rep, router


def post(url: str, who: str, **body) -> httpx.Response:
    body = {"max_tokens": 1, "temperature": 0} | body
    return httpx.post(url + "/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEYS.get(who, who)}"})


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def decisions(router, reason: str) -> float:
    return metric(router.url, "fleetlm_router:policy_decisions_total", reason=reason)


def test_precise_index_finds_a_tenants_blocks_for_that_tenant_only(fleet):
    rep, router = fleet
    prompt = "Manifest 4471: twelve crates of porcelain, two of them cracked, bound for berth nine. " * 3
    assert post(router.url, "alice", prompt=prompt).status_code == 200
    time.sleep(0.5)  # KV events cross a socket
    hits = decisions(router, "prefix_hit")
    assert post(router.url, "alice", prompt=prompt).status_code == 200
    assert decisions(router, "prefix_hit") == hits + 1  # the router found alice's blocks for alice
    misses = decisions(router, "prefix_miss")
    assert post(router.url, "bob", prompt=prompt).status_code == 200  # exactly alice's prompt
    assert decisions(router, "prefix_miss") == misses + 1 and decisions(router, "prefix_hit") == hits + 1
    assert metric(rep.url, "fleetlm:tenant_prefix_cache_hits_total", tenant="bob") == 0
    assert post(router.url, "alice", prompt=PUBLIC + "Where is the ferry?").status_code == 200
    time.sleep(0.5)
    assert post(router.url, "bob", prompt=PUBLIC + "When does the tide turn?").status_code == 200
    assert decisions(router, "prefix_hit") == hits + 2  # the shared prefix: found for bob too
    assert metric(rep.url, "fleetlm:tenant_prefix_cache_hits_total", tenant="bob") > 0


def test_router_buckets_and_streamed_tokens(fleet):
    rep, router = fleet
    for _ in range(3):
        assert post(router.url, "quota", prompt="hi").status_code == 200
    r = post(router.url, "quota", prompt="hi")
    assert r.status_code == 429 and r.json()["error"]["param"] == "requests_per_minute"
    assert 1 <= int(r.headers["Retry-After"]) <= 20
    assert metric(rep.url, "fleetlm:tenant_requests_total", tenant="quota") == 3  # refused at the router
    chunks = []
    with httpx.stream("POST", router.url + "/v1/completions", timeout=120,
                      json={"prompt": "count", "max_tokens": 40, "temperature": 0, "stream": True,
                            "ignore_eos": True},
                      headers={"Authorization": f"Bearer {KEYS['tokens']}"}) as s:
        assert s.status_code == 200
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks and all("usage" not in c for c in chunks)  # the router's own usage request is hidden
    assert metric(router.url, "fleetlm_router:tenant_generation_tokens_total", tenant="tokens") == 40
    prompt_tokens = metric(router.url, "fleetlm_router:tenant_prompt_tokens_total", tenant="tokens")
    assert prompt_tokens == metric(rep.url, "fleetlm:tenant_prompt_tokens_total", tenant="tokens") > 0
    text = router.text()
    for key in (*KEYS.values(), ADMIN):
        assert key not in text
        assert key not in httpx.get(router.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
