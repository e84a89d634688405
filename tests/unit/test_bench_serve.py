"""``fleetlm bench serve`` against a fake OpenAI-compatible server (no model, CPU, fast).

The fake streams ``max_tokens`` one-token chunks: the first after ``first_delay`` seconds, the
rest ``token_delay`` apart, then a finish chunk, a usage chunk (when asked for) and ``[DONE]``.
Timing assertions are loose lower/upper bounds, never speed claims.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import threading

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from fleetlm.bench import serve  # noqa: E402
from fleetlm.bench.serve_datasets import (  # noqa: E402
    SampleRequest,
    arrival_offsets,
    jsonl_requests,
    random_requests,
    shared_prefix_requests,
    token_pool,
)
from fleetlm.bench.serve_metrics import (  # noqa: E402
    RequestResult,
    calculate_metrics,
    format_report,
    is_good,
    parse_goodput,
)


class FakeServer:
    """aiohttp app on a free port, in its own thread and event loop."""

    def __init__(self, first_delay=0.05, token_delay=0.01, fail_every=0, drop_after_first=False,
                 role_chunk=True):
        self.first_delay, self.token_delay = first_delay, token_delay
        self.fail_every, self.drop_after_first, self.role_chunk = fail_every, drop_after_first, role_chunk
        self.active = self.max_active = self.count = 0
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self._ready = threading.Event()

    async def _models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _complete(self, request):
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        self.count += 1
        if self.fail_every and self.count % self.fail_every == 0:
            return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
        chat = request.path.endswith("/chat/completions")
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj):
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        def choice(text, finish=None):
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        n = body["max_tokens"]
        try:
            if chat and self.role_chunk:  # OpenAI's first chat chunk: a role, no text
                await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i in range(n):
                await asyncio.sleep(self.first_delay if i == 0 else self.token_delay)
                await send({"choices": [choice(f"t{i} ")]})
                if self.drop_after_first:
                    request.transport.close()
                    return resp
            await send({"choices": [choice("", "length")]})
            if (body.get("stream_options") or {}).get("include_usage"):
                plen = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 7
                await send({"choices": [], "usage": {"prompt_tokens": plen, "completion_tokens": n,
                                                     "total_tokens": plen + n}})
        finally:
            self.active -= 1  # before [DONE]: the client cannot see the end while we count it
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _serve(self):
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())

    def __enter__(self):
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def run(requests, url, endpoint="/v1/completions", **kw):
    cfg = serve.ClientConfig(url, endpoint, kw.pop("model", ""), kw.pop("api_key", None),
                             ignore_eos=kw.pop("ignore_eos", False), include_usage=kw.pop("include_usage", True))
    results, duration = asyncio.run(serve.run_benchmark(requests, cfg, **kw))
    return cfg, results, duration


def cli_args(url, *extra):
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(["--base-url", url, "--disable-tqdm", *extra])


# -- against the fake server ------------------------------------------------------------------
def test_ttft_itl_tpot_and_usage_counts():
    reqs = random_requests(4, input_len=12, output_len=6, seed=1)
    with FakeServer(first_delay=0.06, token_delay=0.02) as srv:
        cfg, results, duration = run(reqs, srv.url, ignore_eos=True)
    assert cfg.model == "fake-model"  # from GET /v1/models
    assert all(r.success for r in results), [r.error for r in results]
    for r in results:
        assert r.output_tokens == 6 and r.output_len_source == "usage"
        assert r.prompt_len == 12 and r.server_prompt_tokens == 12
        # lower bounds are the fake's sleeps; upper bounds only sanity (a loaded machine is slow)
        assert 0.055 <= r.ttft < 0.06 + 0.5
        assert 0.06 + 5 * 0.02 - 0.005 <= r.latency < 0.16 + 1.0
        assert len(r.itl) == 5 and sum(r.itl) <= r.latency - r.ttft + 1e-9
        assert r.tpot == pytest.approx((r.latency - r.ttft) / 5) and r.tpot < 0.02 + 0.2
    for b in srv.bodies:
        assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
        assert b["ignore_eos"] is True and b["temperature"] == 0 and b["model"] == "fake-model"
        assert isinstance(b["prompt"], list) and len(b["prompt"]) == 12
    m = calculate_metrics(results, duration, percentiles=[50, 99])
    assert m["completed"] == 4 and m["failed"] == 0
    assert m["total_input_tokens"] == 48 and m["total_output_tokens"] == 24
    assert m["output_throughput"] == pytest.approx(24 / duration)
    assert 55 <= m["mean_ttft_ms"] < 560 and 15 <= m["median_itl_ms"] < 220
    assert m["output_len_sources"] == {"usage": 4}


def test_chat_role_chunk_is_first_chunk_and_chunks_counted_without_usage():
    reqs = [SampleRequest("hello there", None, 3) for _ in range(2)]
    with FakeServer(first_delay=0.08, token_delay=0.01) as srv:
        _, results, _ = run(reqs, srv.url, "/v1/chat/completions", model="m", include_usage=False)
    assert srv.bodies[0]["messages"] == [{"role": "user", "content": "hello there"}]
    assert "stream_options" not in srv.bodies[0]
    for r in results:
        # TTFT is the first chunk with choices (here the immediate role chunk), as vLLM's client
        assert r.success and r.ttft < 0.075
        assert r.output_tokens == 3 and r.output_len_source == "chunks"
        assert r.generated_text == "t0 t1 t2 "
        assert r.prompt_len == 0 and r.server_prompt_tokens is None


def test_max_concurrency_is_never_exceeded():
    reqs = random_requests(10, input_len=4, output_len=2, seed=2)
    with FakeServer(first_delay=0.1, token_delay=0.005) as srv:  # long enough for 3 to overlap
        _, results, _ = run(reqs, srv.url, model="m", max_concurrency=3)
    assert all(r.success for r in results)
    assert srv.max_active == 3
    assert calculate_metrics(results, 1.0, percentiles=[99])["max_concurrent_requests"] <= 3


def test_failures_are_counted_not_raised():
    reqs = random_requests(6, input_len=4, output_len=2, seed=3)
    with FakeServer(first_delay=0.0, token_delay=0.0, fail_every=3) as srv:
        _, results, duration = run(reqs, srv.url, model="m")
    m = calculate_metrics(results, duration, percentiles=[99])
    assert m["completed"] == 4 and m["failed"] == 2
    assert m["errors_summary"] == {"HTTP 500: boom": 2}
    assert "HTTP 500: boom" in format_report(m, percentile_metrics=["ttft"], percentiles=[99],
                                             max_concurrency=None, request_rate=math.inf)
    with FakeServer(first_delay=0.0, drop_after_first=True) as srv:  # connection cut mid-stream
        _, results, _ = run(reqs[:2], srv.url, model="m")
    assert not any(r.success for r in results) and all(r.error for r in results)
    # nothing listening: every request fails, the run still ends
    with FakeServer() as srv:
        url = srv.url
    _, results, _ = run(reqs[:2], url, model="m")
    assert [r.success for r in results] == [False, False] and "Connect" in results[0].error


def test_main_end_to_end_with_goodput_and_save_result(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out = tmp_path / "out.json"
    with FakeServer(first_delay=0.03, token_delay=0.005) as srv:
        args = cli_args(srv.url, "--num-prompts", "5", "--random-input-len", "9", "--random-output-len", "4",
                        "--request-rate", "200", "--seed", "7", "--goodput", "ttft:10000", "e2el:0.001",
                        "--metric-percentiles", "50,90,99", "--save-result", str(out))
        assert serve.main(args) == 0
    assert srv.headers[-1]["Authorization"] == "Bearer sk-test"
    assert len(srv.bodies) == 6  # one warm-up + five
    text = capsys.readouterr().out
    assert "Serving Benchmark Result" in text and "P90 TPOT (ms):" in text and "Request goodput" in text
    data = json.loads(out.read_text())
    assert data["completed"] == 5 and data["good_requests"] == 0  # e2el SLO unmeetable: no request is good
    assert data["input_lens"] == [9] * 5 and data["output_lens"] == [4] * 5
    assert len(data["ttfts"]) == len(data["itls"]) == len(data["e2els"]) == 5
    assert data["config"]["request_rate"] == 200 and data["config"]["model"] == "fake-model"
    assert "api_key" not in data["config"]
    for k in ("mean_ttft_ms", "median_tpot_ms", "std_itl_ms", "p90_e2el_ms", "p50_ttft_ms",
              "request_throughput", "output_throughput", "total_token_throughput", "request_goodput"):
        assert math.isfinite(data[k])


def test_main_rejects_token_ids_for_chat():
    args = cli_args("http://127.0.0.1:9", "--endpoint", "/v1/chat/completions", "--num-prompts", "2")
    with pytest.raises(ValueError, match="chat"):
        serve.main(args)


# -- metric math on synthetic records ---------------------------------------------------------
def rec(ttft, latency, n, itl=(), prompt_len=10, success=True):
    return RequestResult(success=success, ttft=ttft, latency=latency, output_tokens=n, itl=list(itl),
                         prompt_len=prompt_len, output_len_source="usage", start_time=1.0,
                         error="" if success else "x")


def test_metric_math():
    rs = [rec(0.1, 1.1, 11, [0.1] * 10), rec(0.2, 0.2, 1), rec(0.3, 2.3, 5, [0.5] * 4),
          rec(0, 0, 0, success=False)]
    m = calculate_metrics(rs, 4.0, percentiles=[50, 90, 99])
    tpots = [(1.1 - 0.1) / 10, (2.3 - 0.3) / 4]  # the 1-token request has no TPOT
    assert m["mean_tpot_ms"] == pytest.approx(np.mean(tpots) * 1000)
    assert m["median_tpot_ms"] == pytest.approx(np.median(tpots) * 1000)
    itls = [0.1] * 10 + [0.5] * 4  # pooled over requests
    assert m["mean_itl_ms"] == pytest.approx(np.mean(itls) * 1000)
    assert m["p90_itl_ms"] == pytest.approx(np.percentile(itls, 90) * 1000)
    assert m["std_ttft_ms"] == pytest.approx(np.std([0.1, 0.2, 0.3]) * 1000)
    assert m["p99_e2el_ms"] == pytest.approx(np.percentile([1.1, 0.2, 2.3], 99) * 1000)
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 17
    assert m["request_throughput"] == 0.75 and m["output_throughput"] == 17 / 4
    assert m["total_token_throughput"] == 47 / 4
    assert "request_goodput" not in m


def test_goodput_needs_every_slo():
    slos = parse_goodput(["ttft:150", "tpot:120"])
    assert slos == {"ttft": 150.0, "tpot": 120.0}
    a, b, c = rec(0.1, 1.1, 11), rec(0.2, 0.3, 2), rec(0.1, 2.1, 11)  # tpot 100, 100, 200 ms
    assert is_good(a, slos) and not is_good(b, slos) and not is_good(c, slos)
    assert is_good(rec(0.1, 9.0, 1), slos)  # one token: TPOT counts as 0, as in vLLM
    m = calculate_metrics([a, b, c], 2.0, percentiles=[99], goodput_slos=slos)
    assert m["good_requests"] == 1 and m["request_goodput"] == 0.5
    assert is_good(a, parse_goodput(["e2el:1100"])) and not is_good(a, parse_goodput(["e2el:1099"]))
    for bad in (["ttft"], ["itl:5"], ["ttft:abc"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


# -- datasets and arrivals --------------------------------------------------------------------
def test_random_dataset_exact_lengths_distinct_and_seeded():
    reqs = random_requests(50, input_len=37, output_len=9, seed=5)
    assert all(len(r.prompt) == r.prompt_len == 37 and r.output_len == 9 for r in reqs)
    assert len({r.prompt[0] for r in reqs}) == 50  # no two share a first token, so no cache block
    assert all(1000 <= t < 40000 for r in reqs for t in r.prompt)
    assert reqs == random_requests(50, input_len=37, output_len=9, seed=5)
    assert reqs != random_requests(50, input_len=37, output_len=9, seed=6)
    varied = random_requests(200, input_len=100, output_len=10, range_ratio=0.5, seed=0)
    lens = [r.prompt_len for r in varied]
    assert min(lens) >= 50 and max(lens) <= 150 and len(set(lens)) > 10
    assert all(len(r.prompt) == r.prompt_len for r in varied)
    pool = np.arange(5, 9)
    assert set(random_requests(3, 20, 2, pool=pool)[0].prompt) <= {5, 6, 7, 8}


def test_shared_prefix_dataset():
    reqs = shared_prefix_requests(9, prefix_len=16, suffix_len=4, num_prefixes=3, output_len=5, seed=0)
    assert all(r.prompt_len == len(r.prompt) == 20 for r in reqs)
    groups = [tuple(r.prompt[:16]) for r in reqs]
    assert len(set(groups)) == 3 and groups[0] == groups[3] == groups[6] != groups[1]
    assert len({tuple(r.prompt[16:]) for r in reqs}) == 9


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a b c", "max_tokens": 3}\n\n{"prompt": "x", "output_len": 7}\n'
                    '{"prompt": [5, 6, 7]}\n')
    reqs = jsonl_requests(str(path), None, 11)
    assert reqs == [SampleRequest("a b c", None, 3), SampleRequest("x", None, 7), SampleRequest([5, 6, 7], 3, 11)]
    assert len(jsonl_requests(str(path), 2, 11)) == 2
    path.write_text('{"max_tokens": 3}\n')
    with pytest.raises(ValueError, match=":1: needs a non-empty 'prompt'"):
        jsonl_requests(str(path), None, 11)


def test_poisson_arrivals_seeded():
    a = arrival_offsets(20000, request_rate=50.0, seed=3)
    assert a[0] == 0 and np.all(np.diff(a) >= 0)
    np.testing.assert_array_equal(a, arrival_offsets(20000, 50.0, seed=3))
    assert not np.array_equal(a, arrival_offsets(20000, 50.0, seed=4))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.05)  # exponential: std == mean
    bursty = np.diff(arrival_offsets(20000, 50.0, burstiness=0.25, seed=3))
    assert bursty.mean() == pytest.approx(1 / 50, rel=0.1) and bursty.std() > 1.5 * gaps.std()
    assert not arrival_offsets(5, math.inf).any()


def test_token_pool_from_tokenizer_skips_special_ids():
    class Tok:
        vocab_size = 3000
        bos_token_id, eos_token_ids = 1, (2, 2500)

        class backend:
            @staticmethod
            def get_added_tokens_decoder():
                return {0: None, 2999: None}

    pool = token_pool(Tok())
    assert pool[0] == 1000 and pool[-1] == 2998 and 2500 not in pool and len(pool) == 1998


def test_sse_parser_handles_split_reads_crlf_and_comments():
    sse = serve._SSE()
    assert sse.feed(b'data: {"a"') == []
    assert sse.feed(b': 1}\r\n\r\n: keep-alive\n\nevent: x\ndata: [DO') == ['{"a": 1}']
    assert sse.feed(b"NE]\n\ndata: 1\ndata: 2\n") == ["[DONE]"]
    assert sse.feed(b"", final=True) == ["1\n2"]


def test_jsonl_chat_with_tokenizer_counts(tmp_path, capsys):
    """A tokenizer from an HF directory gives the input lengths of text prompts and, when the
    server sends no usage, the output counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "big": 2, "world": 3, "t0": 4, "t1": 5, "t2": 6, "t3": 7}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hello big world", "max_tokens": 4}\n{"prompt": "hello", "max_tokens": 2}\n')
    out = tmp_path / "out.json"
    with FakeServer(first_delay=0.0, token_delay=0.0) as srv:
        args = cli_args(srv.url, "--endpoint", "/v1/chat/completions", "--dataset-name", "jsonl",
                        "--dataset-path", str(data), "--tokenizer", str(tmp_path), "--no-stream-usage",
                        "--model", "m", "--num-warmups", "0", "--save-result", str(out))
        assert serve.main(args) == 0
    assert [b["messages"][0]["content"] for b in srv.bodies] == ["hello big world", "hello"]
    res = json.loads(out.read_text())
    assert res["input_lens"] == [3, 1] and res["output_lens"] == [4, 2]
    assert res["output_len_source"] == ["tokenizer", "tokenizer"] and res["output_len_sources"] == {"tokenizer": 2}
    assert "tokenizer 2" in capsys.readouterr().out
