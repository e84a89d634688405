"""Precise prefix routing with tenants (issue 15): the router salts its block hashes the way a
replica does, so its KV-event index finds tenant A's blocks for A and never for B. The replica
side is real: a KV cache manager fills blocks for a request whose ``Tenancy`` comes from the
server's admission path, publishes them over ZMQ, and the router's subscriber indexes them."""

from __future__ import annotations

import asyncio
import json
import types
from dataclasses import dataclass

import pytest

from fleetlm.core.kv_cache_manager import KVCacheManager
from fleetlm.core.kv_events import KVEventPublisher
from fleetlm.request import Request
from fleetlm.router.config import RouterConfig, WorkerSpec
from fleetlm.router.keys import RouteKeyMaker
from fleetlm.router.kv_index import KVEventSubscriber, KVIndex
from fleetlm.router.metrics import RouterMetrics
from fleetlm.router.policies import PolicyConfig, make_policy
from fleetlm.router.tenants import install_tenants
from fleetlm.sampling_params import SamplingParams
from fleetlm.tenancy.admission import resolve, tenancy_for
from fleetlm.tenancy.registry import TenantRegistry

MODEL = "smollm2-135m-instruct"
BS = 16
PUBLIC = "You are a careful assistant who answers questions about shipping, billing and returns. " * 2
TENANTS = f"""\
[tenants.acme]
api_keys = ["sk-acme"]
shared_prefixes = ["pub"]

[tenants.beta]
api_keys = ["sk-beta"]
shared_prefixes = ["pub"]

[shared_prefixes.pub]
text = "{PUBLIC}"
"""
PRIVATE = "Order 7731 from Acme Corp: the customer wants a refund for the damaged crate of glassware. " * 2
A, B = "http://a:1", "http://b:1"


@dataclass
class Rep:
    name: str
    in_flight: int = 0
    kv_usage: float = 0.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("precise")
    f = d / "tenants.toml"
    f.write_text(TENANTS)
    config = RouterConfig(workers=(WorkerSpec(A), WorkerSpec(B)), policy="prefix", model=MODEL, block_size=BS,
                          policy_config=PolicyConfig(prefix_mode="precise"), tenants_file=str(f))
    proxy = types.SimpleNamespace(keys=RouteKeyMaker(config))
    install_tenants(proxy, config, RouterMetrics("prefix"))  # what Router.start does
    tok = proxy.keys.hasher.tok
    server_registry = TenantRegistry(f, encode=lambda text, special: tok.encode(text, add_special_tokens=special))
    return proxy.keys, server_registry, tok, d


def replica_publishes(tmp_path, registry: TenantRegistry, tenant: str, ids: list[int],
                      cache_salt: str | None = None) -> tuple[KVIndex, list[bytes]]:
    """A replica computes this request's prompt (its tenancy as ``fleetlm serve`` resolves it)
    and publishes the blocks; the router's subscriber indexes them under replica A."""
    async def go():
        ep = f"ipc://{tmp_path}/kv-{tenant}-{cache_salt}"
        pub = KVEventPublisher(ep)
        index = KVIndex()
        sub = KVEventSubscriber(index, A, ep)
        sub.start()
        await asyncio.sleep(0.3)  # PUB/SUB join
        kv = KVCacheManager(num_blocks=64, block_size=BS)
        kv.pool.event_sink = pub
        req = Request("r", ids, SamplingParams(max_tokens=1),
                      tenancy=tenancy_for(resolve(registry, tenant, None, cache_salt), ids))
        kv.allocate_slots(req, len(ids))
        pub.flush()
        for _ in range(200):
            if index.blocks.get(A):
                break
            await asyncio.sleep(0.01)
        held = set(index.blocks.get(A, ()))
        await sub.stop()
        pub.close()
        index.blocks[A] = held
        return index, list(req.block_hashes)

    return asyncio.run(go())


def route(keys: RouteKeyMaker, index: KVIndex, key: str, **body):
    """Where the precise prefix policy sends this request (A is busier: a miss goes to B)."""
    rk = keys.make("/v1/completions", json.dumps({"prompt": PRIVATE} | body).encode(),
                   {"Authorization": f"Bearer {key}"})
    policy = make_policy("prefix", PolicyConfig(prefix_mode="precise"), index.matched_blocks)
    d = policy.choose(rk, [Rep(A, in_flight=1), Rep(B)])
    return rk, d


def test_tenant_a_finds_its_blocks_and_tenant_b_never_does(setup, tmp_path):
    keys, server_registry, tok, _ = setup
    ids = tok.encode(PRIVATE, add_special_tokens=True)
    assert len(ids) >= 3 * BS
    index, published = replica_publishes(tmp_path, server_registry, "acme", ids)
    assert index.blocks[A] == set(published) and published

    rk, d = route(keys, index, "sk-acme")
    assert rk.tenant == "acme" and list(rk.block_hashes) == published  # the replica's own hashes
    assert d.replica.name == A and d.reason == "prefix_hit" and d.matched == len(ids) // BS * BS

    rk, d = route(keys, index, "sk-beta")  # exactly A's prompt, from B
    assert rk.tenant == "beta" and not set(rk.block_hashes) & index.blocks[A]
    assert d.replica.name == B and d.reason == "prefix_miss" and d.matched == 0

    _, d = route(keys, index, "sk-acme", cache_salt="mine")  # A's own request salt: private too
    assert d.reason == "prefix_miss" and d.matched == 0


def test_request_cache_salt_enters_the_routers_hashes(setup, tmp_path):
    keys, server_registry, tok, _ = setup
    ids = tok.encode(PRIVATE, add_special_tokens=True)
    index, _ = replica_publishes(tmp_path, server_registry, "beta", ids, cache_salt="s1")
    assert route(keys, index, "sk-beta", cache_salt="s1")[1].reason == "prefix_hit"
    assert route(keys, index, "sk-beta")[1].matched == 0
    assert route(keys, index, "sk-beta", cache_salt="s2")[1].matched == 0


def test_an_explicit_shared_prefix_is_found_for_every_tenant_that_opted_in(setup, tmp_path):
    keys, server_registry, tok, _ = setup
    prompt = PUBLIC + PRIVATE
    ids = tok.encode(prompt, add_special_tokens=True)
    shared_blocks = len(tok.encode(PUBLIC, add_special_tokens=True)) // BS
    assert shared_blocks >= 1
    index, published = replica_publishes(tmp_path, server_registry, "acme", ids)
    a = keys.make("/v1/completions", json.dumps({"prompt": prompt}).encode(), {"Authorization": "Bearer sk-acme"})
    b = keys.make("/v1/completions", json.dumps({"prompt": prompt}).encode(), {"Authorization": "Bearer sk-beta"})
    assert list(a.block_hashes) == published
    assert index.matched_blocks(A, a.block_hashes) == len(published)
    assert index.matched_blocks(A, b.block_hashes) == shared_blocks  # the public blocks only
    assert list(b.block_hashes[:shared_blocks]) == published[:shared_blocks]
