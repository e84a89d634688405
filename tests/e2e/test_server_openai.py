"""The real server on the default model, driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--dtype", "float32", "--kv-cache-memory", "512MiB"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2-135m-instruct"]


def test_chat_answers_and_streams_the_same_text(client):
    full = client.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert "Paris" in text and full.choices[0].finish_reason == "stop"
    assert full.usage.completion_tokens > 0 and full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, max_tokens=24,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


@pytest.mark.parametrize("prompt", ["Emoji list: 🍵 🍎 🍌 🍇", "中文: 你好，世界。日本語: こんにちは",
                                    "The capital of France is"])
def test_completion_stream_equals_non_stream_utf8(client, prompt):
    kw = dict(model="smollm2-135m-instruct", prompt=prompt, max_tokens=40, temperature=0)
    full = client.completions.create(**kw)
    pieces = [c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(pieces) == full.choices[0].text
    # no broken character mid-stream (only a sequence cut by max_tokens may end incomplete)
    assert not any("\ufffd" in p for p in pieces[:-1])
    ch = full.choices[0]
    assert ch.finish_reason == "stop" or (ch.finish_reason == "length" and full.usage.completion_tokens == 40)
    if not prompt.isascii():  # the case this test is for: characters split across tokens
        assert sum(ord(x) > 0x2E80 for x in ch.text) > 5, ch.text


def test_n2_and_seed_reproducibility(client):
    kw = dict(model="smollm2-135m-instruct", messages=CHAT, max_tokens=16, temperature=1.0, n=2, seed=1234)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    c = client.chat.completions.create(**{**kw, "seed": 99})
    assert [x.message.content for x in c.choices] != [x.message.content for x in a.choices]


def test_stop_string_ends_the_text(client):
    base = client.completions.create(model="smollm2-135m-instruct", prompt="One, two, three, four,", max_tokens=12,
                                     temperature=0).choices[0].text
    stop = base.strip().split()[1]  # a word that really comes
    out = client.completions.create(model="smollm2-135m-instruct", prompt="One, two, three, four,", max_tokens=12,
                                    temperature=0, stop=[stop]).choices[0]
    assert out.finish_reason == "stop" and stop not in out.text and base.startswith(out.text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2-135m-instruct", prompt="One, two, three, four,", max_tokens=12, temperature=0, stop=[stop],
        stream=True) if c.choices)
    assert streamed == out.text


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy: the sampled token is the top one
    assert "".join(e.token for e in content).startswith(out.choices[0].message.content[:5])


def test_completion_logprobs_with_echo(client):
    prompt = "The capital of France is"
    out = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=4, temperature=0,
                                    logprobs=2, echo=True)
    ch = out.choices[0]
    assert ch.text.startswith(prompt)
    lp = ch.logprobs
    n_prompt = out.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 4 and lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:])


def test_batch_prompts_match_single_requests(client):
    prompts = ["The capital of France is", "One, two, three,"]
    batch = client.completions.create(model="smollm2-135m-instruct", prompt=prompts, max_tokens=8, temperature=0)
    singles = [client.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=8, temperature=0)
               for p in prompts]
    by_index = {c.index: c.text for c in batch.choices}
    assert by_index == {i: s.choices[0].text for i, s in enumerate(singles)}
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


def test_token_prompt_and_tokenize_round_trip(server, client):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == 8192
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    by_ids = client.completions.create(model="smollm2-135m-instruct", prompt=r["tokens"], max_tokens=6, temperature=0)
    by_text = client.completions.create(model="smollm2-135m-instruct", prompt="Hello world", max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_bad_input_is_a_400_with_an_openai_error(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, logit_bias={"1": 5})
    assert e.value.body["param"] == "logit_bias" and "not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2-135m-instruct", prompt="hi " * 9000, max_tokens=4)
    assert "max_model_len (8192)" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2-135m-instruct", prompt="hi", top_p=0)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")


def test_32_concurrent_greedy_requests_equal_offline_generate(server, llm_fp32):
    from fleetlm import SamplingParams

    prompts = [f"Write one sentence about the number {i}." for i in range(32)]
    max_tokens = [8 + (i * 7) % 25 for i in range(32)]

    async def one(c: httpx.AsyncClient, p: str, n: int) -> str:
        r = await c.post(server.url + "/v1/completions", json={"prompt": p, "max_tokens": n, "temperature": 0})
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(timeout=600) as c:
            return await asyncio.gather(*(one(c, p, n) for p, n in zip(prompts, max_tokens)))

    served = asyncio.run(all_at_once())
    offline = llm_fp32.generate(prompts, [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens],
                                use_tqdm=False)
    assert served == [o.outputs[0].text for o in offline]


def test_metrics_are_exported(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("fleetlm:time_to_first_token_seconds_bucket", "fleetlm:inter_token_latency_seconds_bucket",
                 "fleetlm:request_time_per_output_token_seconds_bucket", "fleetlm:e2e_request_latency_seconds_bucket",
                 "fleetlm:request_queue_time_seconds_bucket", "fleetlm:num_requests_running",
                 "fleetlm:num_requests_waiting", "fleetlm:kv_cache_usage_perc", "fleetlm:prefix_cache_queries_total",
                 "fleetlm:prefix_cache_hits_total", "fleetlm:num_preemptions_total", "fleetlm:prompt_tokens_total",
                 "fleetlm:generation_tokens_total", "fleetlm:http_responses_total"):
        assert name in text, name
    assert server.metric("fleetlm:generation_tokens_total") > 0
    assert server.metric("fleetlm:prefix_cache_hits_total") > 0  # the repeated chat prompts hit
    assert server.metric("fleetlm:prefix_cache_hits_total") <= server.metric("fleetlm:prefix_cache_queries_total")


def test_two_servers_on_one_host(server, tiny_model_dir):
    """IPC socket names carry the PID (and a random suffix): a second server runs beside the first."""
    with ServerProcess(["--dtype", "float32", "--kv-cache-memory", "32MiB"], model=tiny_model_dir) as other:
        body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}
        a = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        b = httpx.post(other.url + "/v1/completions", json=body, timeout=120)
        assert a.status_code == b.status_code == 200
        assert a.json()["model"] == "smollm2-135m-instruct" and b.json()["model"] == str(tiny_model_dir)
