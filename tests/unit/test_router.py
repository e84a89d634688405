"""Router pieces without HTTP: radix tree, policies, breaker, KV events and their index."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest

from fleetlm.core.kv_cache_manager import KVCacheManager
from fleetlm.core.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventPublisher,
    check_endpoint,
    decode_batch,
    offset_endpoint,
)
from fleetlm.request import Request
from fleetlm.router.kv_index import KVIndex
from fleetlm.router.policies import PolicyConfig, RouteKey, check_dp_policy, make_policy
from fleetlm.router.radix import RadixTree
from fleetlm.router.replica import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, normalize_url
from fleetlm.sampling_params import SamplingParams


@dataclass
class FakeReplica:
    name: str
    in_flight: int = 0
    kv_usage: float = 0.0


# -- radix tree ---------------------------------------------------------------------------------
def test_radix_matches_longest_prefix_and_splits_edges():
    t = RadixTree()
    t.insert("hello world")
    t.insert("hello there")
    assert t.match("hello world!") == 11
    assert t.match("hello th") == 8
    assert t.match("help") == 3
    assert t.match("x") == 0
    assert t.size == len("hello world") + len("there")


def test_radix_on_token_tuples_against_brute_force():
    rng = random.Random(0)
    t, keys = RadixTree(), []
    for _ in range(200):
        k = tuple(rng.randrange(4) for _ in range(rng.randrange(1, 12)))
        t.insert(k)
        keys.append(k)
    for _ in range(200):
        q = tuple(rng.randrange(4) for _ in range(rng.randrange(1, 12)))
        want = max(next((i for i in range(min(len(q), len(k))) if q[i] != k[i]), min(len(q), len(k)))
                   for k in keys)
        assert t.match(q) == want


def test_radix_evicts_least_recently_routed_first():
    t = RadixTree(max_size=30)
    t.insert("a" * 10)
    t.insert("b" * 10)
    t.insert("c" * 10)
    t.insert("a" * 10)  # touch a
    t.insert("d" * 10)  # over the bound: b goes first
    assert t.size <= 30
    assert t.match("b" * 10) == 0 and t.match("a" * 10) == 10 and t.match("d" * 10) == 10


# -- policies -----------------------------------------------------------------------------------
def test_round_robin_cycles():
    reps = [FakeReplica("a"), FakeReplica("b"), FakeReplica("c")]
    p = make_policy("round_robin", PolicyConfig())
    assert [p.choose(RouteKey(), reps).replica.name for _ in range(6)] == list("abcabc")


def test_least_load_prefers_fewer_in_flight_and_spreads():
    reps = [FakeReplica("a"), FakeReplica("b")]
    p = make_policy("least_load", PolicyConfig())
    for _ in range(100):  # requests that stay in flight: power of two choices keeps them even
        p.choose(RouteKey(), reps).replica.in_flight += 1
    assert abs(reps[0].in_flight - reps[1].in_flight) <= 1
    reps[0].in_flight, reps[1].in_flight = 10, 2
    assert p.choose(RouteKey(), reps).replica.name == "b"


def test_session_is_sticky_and_forgets_removed_replicas():
    reps = [FakeReplica("a"), FakeReplica("b")]
    p = make_policy("session", PolicyConfig())
    first = p.choose(RouteKey(session="u1"), reps)
    p.on_routed(RouteKey(session="u1"), first.replica)
    first.replica.in_flight = 50  # stickiness beats load
    d = p.choose(RouteKey(session="u1"), reps)
    assert d.replica is first.replica and d.reason == "session_sticky"
    others = [r for r in reps if r is not first.replica]
    assert p.choose(RouteKey(session="u1"), others).reason == "session_new"


def test_prefix_approximate_follows_the_prefix_until_load_is_unbalanced():
    reps = [FakeReplica("a"), FakeReplica("b")]
    p = make_policy("prefix", PolicyConfig(balance_abs_threshold=4, balance_rel_threshold=1.5))
    groups = ["sys prompt A " * 20, "sys prompt B " * 20]
    owner = {}
    for g in groups:
        k = RouteKey(prefix=g + "q0")
        d = p.choose(k, reps)
        p.on_routed(k, d.replica)
        d.replica.in_flight += 1
        owner[g] = d.replica.name
    assert owner[groups[0]] != owner[groups[1]]  # misses go to the least loaded
    for i in range(1, 4):
        for g in groups:
            d = p.choose(RouteKey(prefix=g + f"q{i}"), reps)
            assert d.replica.name == owner[g] and d.reason == "prefix_hit" and d.matched >= len(g)
    hot = next(r for r in reps if r.name == owner[groups[0]])
    hot.in_flight = 20  # a hot prefix must not pile up: balance instead
    d = p.choose(RouteKey(prefix=groups[0] + "q9"), reps)
    assert d.replica.name != hot.name and d.reason == "prefix_balance"


def test_prefix_precise_reads_the_index():
    idx = KVIndex()
    idx.apply("b", KVEventBatch(0, 0.0, [BlockStored([b"h1", b"h2"], None)]))
    reps = [FakeReplica("a"), FakeReplica("b")]
    p = make_policy("prefix", PolicyConfig(prefix_mode="precise"), idx.matched_blocks)
    d = p.choose(RouteKey(block_hashes=[b"h1", b"h2", b"h3"], block_size=16), reps)
    assert d.replica.name == "b" and d.matched == 32 and d.reason == "prefix_hit"
    with pytest.raises(ValueError, match="KV events"):
        make_policy("prefix", PolicyConfig(prefix_mode="precise"))


def test_unknown_policies_are_errors():
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        make_policy("fastest", PolicyConfig())
    with pytest.raises(ValueError, match="session"):
        check_dp_policy("session")


# -- circuit breaker ----------------------------------------------------------------------------
def test_breaker_opens_half_opens_and_closes():
    b = CircuitBreaker(failure_threshold=2, cooldown_s=10)
    b.record_failure(now=0)
    assert b.state == CLOSED and b.allows(now=0)
    b.record_failure(now=0)
    assert b.state == OPEN and not b.allows(now=5)
    assert b.allows(now=10) and b.state == HALF_OPEN
    b.on_routed()
    assert not b.allows(now=10)  # one trial at a time
    b.record_failure(now=11)
    assert b.state == OPEN and not b.allows(now=12)
    assert b.allows(now=21)
    b.record_success()
    assert b.state == CLOSED


def test_worker_urls_are_checked():
    assert normalize_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    for bad in ("127.0.0.1:8000", "ftp://x:1", "http://x:1/v1"):
        with pytest.raises(ValueError, match="worker URL"):
            normalize_url(bad)


def test_router_config_errors_name_the_problem():
    from fleetlm.router.config import RouterConfig, WorkerSpec

    with pytest.raises(ValueError, match="more than once"):
        RouterConfig(workers=(WorkerSpec("http://a:1"), WorkerSpec("http://a:1/")))
    with pytest.raises(ValueError, match="--model"):
        RouterConfig(policy="prefix", policy_config=PolicyConfig(prefix_mode="precise"))
    with pytest.raises(ValueError, match="kv_events_endpoint"):
        WorkerSpec("http://a:1", "udp://x")


# -- KV events ----------------------------------------------------------------------------------
class RecordingSink:
    def __init__(self) -> None:
        self.events = []

    def stored(self, h, parent):
        self.events.append(("stored", h, parent))

    def removed(self, h):
        self.events.append(("removed", h))

    def cleared(self):
        self.events.append(("cleared",))


def test_block_pool_reports_stored_and_evicted_blocks_with_stable_hashes():
    from fleetlm.core.block_pool import prompt_block_hashes

    kv = KVCacheManager(num_blocks=4, block_size=4)
    sink = RecordingSink()
    kv.pool.event_sink = sink
    req = Request("r", list(range(9)), SamplingParams(max_tokens=1))
    kv.allocate_slots(req, 9)
    hashes = prompt_block_hashes(list(range(9)), 4)
    assert sink.events == [("stored", hashes[0], None), ("stored", hashes[1], hashes[0])]
    kv.free(req)
    other = Request("o", [100 + i for i in range(16)], SamplingParams(max_tokens=1))
    kv.allocate_slots(other, 16)  # needs every block: the cached ones are evicted
    removed = {e[1] for e in sink.events if e[0] == "removed"}
    assert removed == set(hashes)
    kv.free(other)
    assert kv.reset_prefix_cache() and sink.events[-1] == ("cleared",)


def test_publisher_batches_and_index_applies_with_gap_reset(tmp_path):
    import zmq

    ep = f"ipc://{tmp_path}/kv"
    pub = KVEventPublisher(ep)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(ep)
    time.sleep(0.3)  # PUB/SUB join
    pub.stored(b"a", None)
    pub.stored(b"b", b"a")  # extends the chain in the same event
    pub.removed(b"z")
    pub.flush()
    pub.flush()  # nothing new: no message
    assert sub.poll(5000)
    topic, seq, payload = sub.recv_multipart()
    batch = decode_batch(payload)
    assert topic == b"kv" and int.from_bytes(seq, "big") == 0 == batch.seq
    assert batch.events == [BlockStored([b"a", b"b"], None), BlockRemoved([b"z"])]
    idx = KVIndex()
    idx.apply("r", batch)
    assert idx.matched_blocks("r", [b"a", b"b", b"c"]) == 2
    idx.apply("r", KVEventBatch(1, 0.0, [BlockRemoved([b"b"])]))
    assert idx.matched_blocks("r", [b"a", b"b"]) == 1
    idx.apply("r", KVEventBatch(5, 0.0, [BlockStored([b"x"], None)]))  # gap: forget what we knew
    assert idx.matched_blocks("r", [b"a"]) == 0 and idx.matched_blocks("r", [b"x"]) == 1 and idx.num_gaps == 1
    idx.apply("r", KVEventBatch(6, 0.0, [AllBlocksCleared()]))
    assert idx.matched_blocks("r", [b"x"]) == 0
    sub.close(linger=0)
    ctx.term()
    pub.close()


def test_endpoints():
    assert check_endpoint("tcp://127.0.0.1:5557") and check_endpoint("ipc:///tmp/x")
    with pytest.raises(ValueError):
        check_endpoint("tcp://127.0.0.1")
    assert offset_endpoint("tcp://h:5557", 2) == "tcp://h:5559"
    assert offset_endpoint("ipc:///tmp/x", 1) == "ipc:///tmp/x-1"


def test_route_keys_parse_only_what_the_policy_needs():
    from fleetlm.router.config import RouterConfig
    from fleetlm.router.keys import RouteKeyMaker, prompt_text

    rr = RouteKeyMaker(RouterConfig(policy="round_robin"))
    assert rr.make("/v1/completions", b"not json", {}) == RouteKey()
    sess = RouteKeyMaker(RouterConfig(policy="session"))
    assert sess.make("/v1/completions", b'{"prompt": "x", "user": "u"}', {}).session == "u"
    assert sess.make("/v1/completions", b'{"prompt": "x", "user": "u"}', {"x-session-id": "h"}).session == "h"
    assert prompt_text("/v1/completions", {"prompt": ["a", "b"]}) == "a"
    chat = prompt_text("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert "hi" in chat and "user" in chat


# -- data-parallel balancer ---------------------------------------------------------------------
def test_dp_balancer_keeps_samples_together_and_counts_finishes_and_aborts():
    from fleetlm.core.sched_output import EngineCoreOutput
    from fleetlm.engine.core_proc import AddRequests, CoreOutputs, NewRequest
    from fleetlm.engine.dp_client import DPBalancer, merge_stats
    from fleetlm.metrics.stats import SchedulerStats

    b = DPBalancer(2, "round_robin")
    sp = SamplingParams(max_tokens=1)
    i = b.route_add(AddRequests([NewRequest("a#0", [1], sp, (), 0.0), NewRequest("a#1", [1], sp, (), 0.0)]))
    j = b.route_add(AddRequests([NewRequest("b", [1], sp, (), 0.0)]))
    assert i != j and b.owner == {"a#0": i, "a#1": i, "b": j} and b.views[i].in_flight == 2
    b.on_outputs(i, CoreOutputs([EngineCoreOutput("a#0", [5], finish_reason="length")], SchedulerStats()))
    assert b.views[i].in_flight == 1
    assert b.route_abort(["a#1", "zzz"]) == {i: ["a#1"]} and b.views[i].in_flight == 0
    b.on_outputs(i, CoreOutputs([EngineCoreOutput("a#1", [], finish_reason="abort")], SchedulerStats()))
    assert b.views[i].in_flight == 0  # not counted twice
    merged = merge_stats([SchedulerStats(num_blocks=100, kv_cache_usage=0.5, prefix_hits=3),
                          SchedulerStats(num_blocks=300, kv_cache_usage=0.1, prefix_hits=4)])
    assert merged.num_blocks == 400 and merged.prefix_hits == 7 and abs(merged.kv_cache_usage - 0.2) < 1e-9
    if hasattr(SchedulerStats, "spec_accepted_per_pos"):  # per-position tuples add up per position
        t = merge_stats([SchedulerStats(spec_accepted_per_pos=(1, 2)), SchedulerStats(spec_accepted_per_pos=(3,))])
        assert t.spec_accepted_per_pos == (4, 2)
