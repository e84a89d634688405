"""``fleetlm serve --tenants`` end to end (issue 15), on a tiny random-weight model: the prefix
cache side channel, shared named prefixes, priority ranges, quotas with Retry-After, reload on
SIGHUP, and keys never in logs or metrics. Nothing here asserts a speed."""

from __future__ import annotations

import math
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow

KEYS = {"alice": "sk-alice-SECRET-1", "bob": "sk-bob-SECRET-2", "quota": "sk-quota-SECRET-3",
        "tokens": "sk-tokens-SECRET-4", "conc": "sk-conc-SECRET-5"}
ADMIN = "sk-admin-SECRET-0"
PUBLIC = ("You are a careful assistant for the fleet operations team. Answer briefly, cite the runbook "
          "section when you can, never guess at numbers, and say so when you do not know. ") * 3
TENANTS = f"""\
[tenants.alice]
api_keys = ["{KEYS['alice']}"]
shared_prefixes = ["pub"]
salt = "alice-salt-SECRET-a"

[tenants.bob]
api_keys = ["{KEYS['bob']}"]
shared_prefixes = ["pub"]
priority_range = [0, 3]

[tenants.quota]
api_keys = ["{KEYS['quota']}"]
requests_per_minute = 20

[tenants.tokens]
api_keys = ["{KEYS['tokens']}"]
tokens_per_minute = 100

[tenants.conc]
api_keys = ["{KEYS['conc']}"]
max_concurrent_requests = 1

[shared_prefixes.pub]
text = "{PUBLIC}"
"""


def port_in_range(lo: int = 18200, hi: int = 18300) -> int:
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18200-18299")


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    f.write_text(TENANTS)
    return f


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tenants_file):
    s = ServerProcess(["--dtype", "float32", "--kv-cache-memory", "32MiB", "--num-threads", "1",
                       "--tenants", str(tenants_file), "--api-key", ADMIN], model=tiny_model_dir, api_key=ADMIN)
    s.port = port_in_range()
    s.url = f"http://127.0.0.1:{s.port}"
    s.cmd[s.cmd.index("--port") + 1] = str(s.port)
    with s:
        yield s


def post(srv, who: str, timeout: float = 120, **body) -> httpx.Response:
    body = {"max_tokens": 1, "temperature": 0} | body
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {KEYS.get(who, who)}"})


def tenant_metric(srv, name: str, tenant: str) -> float:
    text = httpx.get(srv.url + "/metrics", headers=srv.headers, timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"fleetlm:{name}{{") and f'tenant="{tenant}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_other_tenant_gets_no_hits_on_an_identical_long_prompt(srv):
    prompt = list(range(1000, 1300))  # 300 tokens: 18 full blocks
    assert post(srv, "alice", prompt=prompt).status_code == 200
    hits = srv.metric("fleetlm:prefix_cache_hits_total")
    assert post(srv, "bob", prompt=prompt).status_code == 200
    assert srv.metric("fleetlm:prefix_cache_hits_total") == hits  # B computed all of it, like a cold prompt
    assert tenant_metric(srv, "tenant_prefix_cache_hits_total", "bob") == 0
    assert post(srv, "alice", prompt=prompt).status_code == 200
    assert tenant_metric(srv, "tenant_prefix_cache_hits_total", "alice") >= 288  # the owner still hits


def test_request_cache_salt_isolates_within_a_tenant(srv):
    prompt = list(range(2000, 2200))
    assert post(srv, "bob", prompt=prompt, cache_salt="one").status_code == 200
    before = tenant_metric(srv, "tenant_prefix_cache_hits_total", "bob")
    assert post(srv, "bob", prompt=prompt, cache_salt="two").status_code == 200
    assert tenant_metric(srv, "tenant_prefix_cache_hits_total", "bob") == before
    assert post(srv, "bob", prompt=prompt, cache_salt="one").status_code == 200
    assert tenant_metric(srv, "tenant_prefix_cache_hits_total", "bob") >= before + 192


def test_shared_named_prefix_is_hit_by_both_tenants(srv):
    assert post(srv, "alice", prompt=PUBLIC + " Where is runbook 7?").status_code == 200
    before = tenant_metric(srv, "tenant_prefix_cache_hits_total", "bob")
    assert post(srv, "bob", prompt=PUBLIC + " How do I drain a node?").status_code == 200
    n_public = len(httpx.post(srv.url + "/tokenize", json={"prompt": PUBLIC}, headers=srv.headers).json()["tokens"])
    gained = tenant_metric(srv, "tenant_prefix_cache_hits_total", "bob") - before
    assert gained >= (n_public - 1) // 16 * 16 - 16 and gained > 0, (gained, n_public)


def test_priority_outside_the_tenants_range_is_400(srv):
    for who, prio in (("bob", 4), ("bob", -1), ("alice", 1)):
        r = post(srv, who, prompt="hi", priority=prio)
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
    assert post(srv, "bob", prompt="hi", priority=3).status_code == 200
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {KEYS['bob']}"},
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": 2,
                         "cache_salt": "chat-salt"})
    assert r.status_code == 200, r.text
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {KEYS['bob']}"},
                   json={"messages": [{"role": "user", "content": "hi"}], "priority": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"


def test_requests_per_minute_gives_429_with_retry_after_then_succeeds(srv):
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:  # 26 at once: a minute's worth (20) and more
        rs = list(pool.map(lambda _: post(srv, "quota", prompt="hi"), range(26)))
    elapsed = time.monotonic() - t0
    ok = sum(r.status_code == 200 for r in rs)
    refused = [r for r in rs if r.status_code != 200]
    assert 20 <= ok <= 20 + math.ceil(elapsed * 20 / 60), (ok, elapsed)  # plus what refilled meanwhile
    assert refused and all(r.status_code == 429 for r in refused), [r.text for r in refused]
    err = refused[-1].json()["error"]
    assert err["param"] == "requests_per_minute" and err["code"] == "rate_limit_exceeded"
    assert "requests_per_minute" in err["message"] and err["type"] == "rate_limit_error"
    wait = int(refused[-1].headers["Retry-After"])
    assert 1 <= wait <= 3  # 60 s / 20 per minute
    r = post(srv, "quota", prompt="hi")
    if r.status_code == 429:  # the bucket is still empty: waiting what it says is enough
        time.sleep(int(r.headers["Retry-After"]))
        r = post(srv, "quota", prompt="hi")
    assert r.status_code == 200, r.text


def test_tokens_per_minute_counts_streamed_output(srv):
    with httpx.stream("POST", srv.url + "/v1/completions", timeout=120,
                      headers={"Authorization": f"Bearer {KEYS['tokens']}"},
                      json={"prompt": list(range(10, 20)), "max_tokens": 80, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        assert sum(1 for line in r.iter_lines() if line.startswith("data: {")) >= 1
    r = post(srv, "tokens", prompt=list(range(100, 150)))  # 10 + 80 spent: 50 more would pass without output
    assert r.status_code == 429 and r.json()["error"]["param"] == "tokens_per_minute", r.text
    assert int(r.headers["Retry-After"]) >= 1


def test_max_concurrent_requests(srv):
    done = threading.Event()

    def long_request():
        post(srv, "conc", prompt="go", max_tokens=1000, ignore_eos=True)
        done.set()

    t = threading.Thread(target=long_request)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while tenant_metric(srv, "tenant_requests_total", "conc") < 1:  # admitted
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = post(srv, "conc", prompt="again")
        assert not done.is_set(), "the long request ended too soon to test the bound"
        assert r.status_code == 429 and r.json()["error"]["param"] == "max_concurrent_requests", r.text
    finally:
        t.join(120)
    assert post(srv, "conc", prompt="again").status_code == 200  # the slot was released


def test_tenant_cannot_read_metrics_and_bad_key_is_401(srv):
    assert httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEYS['bob']}"}).status_code == 403
    assert post(srv, "sk-wrong", prompt="hi").status_code == 401


def test_reload_on_sighup(srv, tenants_file):
    carol = "sk-carol-SECRET-6"
    tenants_file.write_text(TENANTS.replace("weight", "weight").replace(
        "[shared_prefixes.pub]", f'[tenants.carol]\napi_keys = ["{carol}"]\n\n[shared_prefixes.pub]'))
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while post(srv, carol, prompt="hi").status_code != 200:
        assert time.monotonic() < deadline, "reload did not take effect"
        time.sleep(0.2)
    tenants_file.write_text(TENANTS.replace('priority_range = [0, 3]', 'priority_range = [3, 0]'))
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "tenants reload failed" not in srv.log():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "tenants.toml:" in srv.log()
    assert post(srv, carol, prompt="hi").status_code == 200  # the old table stays


def test_request_admitted_before_a_reload_finishes_under_the_old_rules(srv, tenants_file):
    result = {}

    def long_request():
        result["r"] = post(srv, "bob", prompt="go", max_tokens=300, ignore_eos=True, priority=3)

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.3)
    tenants_file.write_text(TENANTS.replace(f'api_keys = ["{KEYS["bob"]}"]', 'api_keys = ["sk-bob-rotated"]'))
    srv.proc.send_signal(signal.SIGHUP)
    t.join(120)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 300
    deadline = time.monotonic() + 30
    while post(srv, "bob", prompt="hi").status_code != 401:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    tenants_file.write_text(TENANTS)
    srv.proc.send_signal(signal.SIGHUP)


def test_keys_and_salts_never_in_logs_or_metrics(srv):
    metrics = httpx.get(srv.url + "/metrics", headers=srv.headers).text
    assert 'tenant="alice"' in metrics and "fleetlm:tenant_rate_limited_total" in metrics
    for text in (metrics, srv.log()):
        assert "SECRET" not in text and "sk-" not in text


def test_bad_tenants_file_at_start_is_exit_code_2(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.toml"
    bad.write_text(TENANTS.replace('shared_prefixes = ["pub"]\nsalt', 'weight = 0\nsalt'))
    p = subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", "serve", str(tiny_model_dir),
                        "--tenants", str(bad), "--port", str(port_in_range())], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    assert "bad.toml:3:" in p.stderr and "weight" in p.stderr and "SECRET" not in p.stderr
