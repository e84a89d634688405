"""Disaggregated prefill/decode on a tiny random Llama (fp32): a producer LLM prefills and
stages the K/V, a consumer LLM fetches it and decodes. Greedy tokens equal the co-located
engine's for every transport; the second turn of a conversation moves only its new blocks;
aborts and failed transfers free every block on both sides; the consumer keeps decoding other
requests while a transfer is in progress; bad configurations are refused naming the field."""

from __future__ import annotations

import random
import threading
import time

import pytest

from fleetlm import LLM, SamplingParams
from fleetlm.disagg.config import KVTransferConfig
from fleetlm.disagg.offline import decode, generate_disaggregated, prefill
from fleetlm.disagg.transports import TRANSPORTS
from tests.helpers import make_tiny_hf_dir
from tests.server_utils import free_port

PROMPTS = [list(range(100, 137)), [5, 17, 300, 42], list(range(100, 120)) + [1, 2, 3], [7] * 16,
           list(range(2000, 2090, 3))]
SP = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
ENGINE = {"dtype": "float32", "num_kv_blocks": 64}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny_disagg"), initializer_range=0.2)


@pytest.fixture(scope="module")
def reference(tiny):
    with LLM(str(tiny), **ENGINE) as llm:
        return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP,
                                                             use_tqdm=False)]


def pair(tiny, transport: str, producer_kw: dict | None = None, consumer_kw: dict | None = None, **cfg):
    addr = f"127.0.0.1:{free_port()}"
    p = LLM(str(tiny), **{**ENGINE, **(producer_kw or {})},
            kv_transfer_config={"role": "producer", "transport": transport, "address": addr, **cfg})
    c = LLM(str(tiny), **{**ENGINE, **(consumer_kw or {})},
            kv_transfer_config={"role": "consumer", "transport": transport, "producers": [addr], **cfg})
    return p, c


@pytest.fixture(scope="module")
def tcp_pair(tiny):
    p, c = pair(tiny, "tcp")
    with p, c:
        yield p, c


def free_blocks(llm) -> int:
    return llm.engine.core.scheduler.kv.num_free_blocks


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_greedy_through_producer_and_consumer_equals_colocated(tiny, reference, transport, request):
    p, c = request.getfixturevalue("tcp_pair") if transport == "tcp" else pair(tiny, transport)
    try:
        before = c.engine.core.kv_connector.stats()
        assert generate_disaggregated(p, c, PROMPTS, SP) == reference
        stats = c.engine.core.kv_connector.stats()
        assert stats["received"] - before["received"] == len(PROMPTS)
        assert stats["bytes_moved"] > before["bytes_moved"] and stats["seconds"] > before["seconds"]
        assert p.engine.core.kv_connector.stats()["staged_now"] == 0  # released after the fetch
        assert free_blocks(p) == free_blocks(c) == 64
    finally:
        if transport != "tcp":
            p.shutdown()
            c.shutdown()


def test_second_turn_moves_only_the_new_blocks(tiny, tcp_pair):
    p, c = tcp_pair
    conn = c.engine.core.kv_connector
    turn1 = list(range(30300, 30341))  # 41 tokens: 2 full blocks + 9 (no earlier test used them)
    moved0, hit0 = conn.stats()["bytes_moved"], conn.consumer.blocks_hit
    first = generate_disaggregated(p, c, [turn1], SP)[0]
    moved1 = conn.stats()["bytes_moved"] - moved0
    bpb = moved1 // 3  # 3 blocks for 41 tokens
    turn2 = turn1 + first + list(range(500, 530))  # 79 tokens: 4 full blocks + 15
    second = generate_disaggregated(p, c, [turn2], SP)[0]
    moved2 = conn.stats()["bytes_moved"] - moved1 - moved0
    # the consumer holds turn 1's 2 full prompt blocks and the block its decode filled (tokens
    # 32..47, K/V of 41 prompt + 7 generated tokens): only blocks 3 and 4 (tokens 48..78) travel
    assert conn.consumer.blocks_hit - hit0 == 3
    assert moved2 == 2 * bpb
    with LLM(str(tiny), **ENGINE) as ref:
        expected = ref.generate([{"prompt_token_ids": turn2}], SP, use_tqdm=False)[0].outputs[0].token_ids
    assert second == expected


def test_the_consumer_keeps_decoding_while_a_transfer_is_in_flight(tcp_pair, monkeypatch):
    p, c = tcp_pair
    pre = prefill(p, [PROMPTS[0]], SP)
    consumer = c.engine.core.kv_connector.consumer
    gate = threading.Event()
    real = consumer.client.fetch

    def slow_fetch(*a):
        gate.wait(10)
        return real(*a)

    monkeypatch.setattr(consumer.client, "fetch", slow_fetch)
    eng = c.engine
    eng.add_request("other", None, [9, 8, 7, 6], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    from fleetlm.disagg import offline

    offline._submit(c, pre[0].prompt_token_ids + [pre[0].output.outputs[0].token_ids[0]],
                    SamplingParams(max_tokens=7, temperature=0, ignore_eos=True), pre[0].kv_transfer_params, "x")
    finished = {}
    for _ in range(50):
        for o in eng.step():
            finished[o.request_id] = o
        if "other" in finished:
            break
    assert "other" in finished  # decoded to the end while "x" waited for its K/V
    assert eng.core.scheduler.requests["x"].status.value == "waiting_for_kv"
    gate.set()
    while "x" not in finished:
        for o in eng.step():
            finished[o.request_id] = o
    monkeypatch.undo()
    assert [pre[0].output.outputs[0].token_ids[0], *finished["x"].outputs[0].token_ids] == \
        generate_disaggregated(p, c, [PROMPTS[0]], SP)[0]


def test_failed_and_expired_transfers_end_with_an_error_and_free_their_blocks(tiny):
    p, c = pair(tiny, "shm", handle_ttl_s=0.3)
    with p, c:
        pre = prefill(p, PROMPTS[:2], SP)
        time.sleep(0.6)  # the first handle expires at the producer
        bogus = [pre[1].__class__(pre[1].request_id + "-nope", pre[1].prompt_token_ids, pre[1].output,
                                  {**pre[1].kv_transfer_params, "transfer_id": "nope"})]
        out = decode(c, [pre[0]] + bogus, SP)
        assert all(isinstance(o, str) and "unknown or expired kv transfer handle" in o for o in out)
        assert free_blocks(p) == free_blocks(c) == 64
        assert p.engine.core.kv_connector.stats()["staged_now"] == 0  # expired and released


def test_200_requests_with_random_aborts_free_every_block_on_both_sides(tcp_pair):
    """10 waves of 20: each consumer request is aborted at a random step (before its fetch lands,
    while decoding, or never), and one producer prefill per wave is aborted before it finishes.
    Every request ends with an output or as aborted; both pools are back to their start."""
    from fleetlm.disagg import offline

    p, c = tcp_pair
    rng = random.Random(0)
    start_p, start_c = free_blocks(p), free_blocks(c)
    sp = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    ended = 0
    for wave in range(10):
        prompts = [[rng.randrange(100, 40000) for _ in range(rng.randrange(3, 60))] for _ in range(20)]
        pre = prefill(p, prompts, SP)
        abort_at = {f"w{wave}-{i}": rng.choice([0, 1, 2, 4, 8, None, None]) for i in range(20)}
        for i, pr in enumerate(pre):
            offline._submit(c, pr.prompt_token_ids + [pr.output.outputs[0].token_ids[0]], sp,
                            pr.kv_transfer_params, f"w{wave}-{i}")
        offline._submit(p, prompts[0], SamplingParams(max_tokens=1, temperature=0), {"do_remote_decode": True},
                        f"gone-{wave}")
        p.engine.abort_request(f"gone-{wave}")  # the client left before its first token
        done: dict = {}
        for step in range(200):
            for rid, at in abort_at.items():
                if at == step and rid not in done:
                    c.engine.abort_request(rid)
                    done[rid] = "aborted"
            for o in c.engine.step():
                assert o.error is None and len(o.outputs[0].token_ids) == 7
                done[o.request_id] = o
            if len(done) == 20:
                break
        assert set(done) == set(abort_at)
        ended += len(done)
    assert ended == 200
    deadline = time.time() + 10
    while p.engine.core.kv_connector.stats()["staged_now"] and time.time() < deadline:
        time.sleep(0.05)  # handles of requests aborted before their fetch expire (ttl)
    assert free_blocks(p) == start_p and free_blocks(c) == start_c
    assert not c.engine.core.kv_connector.has_pending()


def test_mismatched_block_size_or_model_fails_at_the_handshake(tiny, tmp_path):
    p, c = pair(tiny, "tcp", consumer_kw={"block_size": 8, "num_kv_blocks": 128})
    with p, c:
        out = generate_disaggregated(p, c, PROMPTS[:1], SP)
        assert "handshake" in out[0] and "block size" in out[0]
        assert free_blocks(c) == 128
    other = make_tiny_hf_dir(tmp_path / "other", seed=1, initializer_range=0.2)
    addr = f"127.0.0.1:{free_port()}"
    with LLM(str(tiny), **ENGINE, kv_transfer_config={"role": "producer", "address": addr}) as p, \
            LLM(str(other), **ENGINE, kv_transfer_config={"role": "consumer", "producers": addr}) as c:
        out = generate_disaggregated(p, c, PROMPTS[:1], SP)
        assert "handshake" in out[0] and "model (weights)" in out[0]


@pytest.mark.parametrize("cfg, needle", [
    ({"role": "consumer", "transport": "tcp"}, "consumer without a producer"),
    ({"role": "producer", "transport": "carrier-pigeon", "address": "h:1"}, "transport 'carrier-pigeon'"),
    ({"role": "decoder", "producers": ["h:1"]}, "role must be one of"),
    ({"role": "producer"}, "needs an 'address'"),
    ({"role": "consumer", "producers": ["nohost"]}, "is not host:port"),
    ({"role": "both", "address": "h:1", "colour": "red"}, "unknown key(s) colour"),
    ('{"role": ', "not valid JSON"),
])
def test_bad_kv_transfer_config_is_refused_naming_it(cfg, needle):
    with pytest.raises(ValueError, match="kv_transfer_config") as e:
        KVTransferConfig.parse(cfg)
    assert needle in str(e.value)


def test_kv_transfer_params_are_checked(tiny, tcp_pair):
    with LLM(str(tiny), **ENGINE) as llm:
        from fleetlm.request import Request

        with pytest.raises(ValueError, match="no kv_transfer_config"):
            llm.engine.core.add_request(Request("r", [1, 2, 3], SP, kv_transfer_params={"do_remote_decode": True}))
    p, c = tcp_pair
    from fleetlm.request import Request

    with pytest.raises(ValueError, match="max_tokens = 1"):
        p.engine.core.add_request(Request("r", [1, 2, 3], SP, kv_transfer_params={"do_remote_decode": True}))
    with pytest.raises(ValueError, match="not a K/V consumer"):
        p.engine.core.add_request(Request("r", [1, 2, 3], SP,
                                          kv_transfer_params={"remote_address": "h:1", "transfer_id": "x"}))
    out = decode(c, [prefill(p, PROMPTS[:1], SP)[0].__class__(
        "z", PROMPTS[0], prefill(p, PROMPTS[:1], SP)[0].output,
        {"remote_address": "10.0.0.1:9", "transfer_id": "x"})], SP)
    assert "not in this consumer's kv_transfer_config.producers" in out[0]
    assert free_blocks(c) == 64


def test_role_both_prefills_and_decodes_in_one_engine(tiny, reference):
    addr = f"127.0.0.1:{free_port()}"
    with LLM(str(tiny), **ENGINE, kv_transfer_config={"role": "both", "transport": "shm", "address": addr}) as llm:
        assert generate_disaggregated(llm, llm, PROMPTS, SP) == reference
        assert free_blocks(llm) == 64
