"""Heterogeneous layouts: a producer at TP=1 and a consumer at TP=3 (each its own server, so each
its own process group) exchange K/V correctly: the consumer's ranks each take their KV heads out
of the staged layout (``disagg/layout.py``), and greedy text equals one co-located server's. A
producer at TP=3 merges its ranks' heads for a consumer at TP=1 the same way."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import make_tiny_hf_dir
from tests.server_utils import ServerProcess, free_port

pytestmark = pytest.mark.slow
COMMON = ["--dtype", "float32", "--kv-cache-memory", "4194304"]
PROMPTS = ["The quick brown fox jumps over the lazy dog and then", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13"]


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):  # 6 heads, 6 KV heads, MLP 192: TP=3 splits everything evenly
    return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny_tp3"), hidden_size=96, num_attention_heads=6,
                            num_key_value_heads=6, intermediate_size=192, initializer_range=0.2)


def body(prompt: str, **kw) -> dict:
    return {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, **kw}


@pytest.mark.parametrize("tp_p, tp_d", [(1, 3), (3, 1)])
def test_producer_and_consumer_with_different_tp_sizes(tiny3, tp_p, tp_d):
    addr = f"127.0.0.1:{free_port()}"
    prod = ServerProcess(COMMON + ["--tensor-parallel-size", str(tp_p), "--kv-transfer-config",
                                   json.dumps({"role": "producer", "address": addr})], model=tiny3)
    cons = ServerProcess(COMMON + ["--tensor-parallel-size", str(tp_d), "--kv-transfer-config",
                                   json.dumps({"role": "consumer", "producers": [addr]})], model=tiny3)
    with prod as p, cons as d:
        for prompt in PROMPTS:
            want = httpx.post(p.url + "/v1/completions", json=body(prompt), timeout=60).json()["choices"][0]["text"]
            pre = httpx.post(p.url + "/v1/completions", json=body(prompt, max_tokens=1,
                                                                  kv_transfer_params={"do_remote_decode": True}),
                             timeout=60).json()
            rest = httpx.post(d.url + "/v1/completions", json=body(prompt, max_tokens=9,
                                                                   kv_transfer_params=pre["kv_transfer_params"]),
                              timeout=60)
            assert rest.status_code == 200, rest.text
            assert pre["choices"][0]["text"] + rest.json()["choices"][0]["text"] == want
