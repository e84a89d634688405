"""``fleetlm bench serve``: load-test any OpenAI-compatible server (TTFT, TPOT, ITL, E2EL, goodput).

Requests stream (SSE) from ``/v1/completions`` or ``/v1/chat/completions``; they arrive as a
Poisson process at ``--request-rate`` (gamma-distributed gaps with ``--burstiness``; default: all
at once), optionally capped at ``--max-concurrency`` in flight. Metrics are defined as
``vllm bench serve`` defines them: see ``fleetlm/bench/serve_metrics.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetlm.bench.serve_datasets import (
    SampleRequest,
    arrival_offsets,
    build_requests,
    load_tokenizer,
    token_pool,
)
from fleetlm.bench.serve_metrics import (
    METRICS,
    RequestResult,
    calculate_metrics,
    format_report,
    parse_goodput,
    parse_metric_names,
    parse_percentiles,
    result_json,
)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
NO_CONTENT = "the stream ended without a chunk of generated text"
TIMEOUT_S = 6 * 3600


@dataclass
class ClientConfig:
    base_url: str
    endpoint: str = "/v1/completions"
    model: str = ""
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = False
    include_usage: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return self.endpoint.endswith("/chat/completions")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def build_payload(req: SampleRequest, cfg: ClientConfig) -> dict[str, Any]:
    body: dict[str, Any] = {"model": cfg.model, "max_tokens": req.output_len,
                            "temperature": cfg.temperature, "stream": True}
    if cfg.chat:
        if not isinstance(req.prompt, str):
            raise ValueError("token-id prompts cannot go to /v1/chat/completions; use --endpoint "
                             "/v1/completions, or --dataset-name jsonl with text prompts")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if cfg.include_usage:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body | cfg.extra_body


class _SSE:
    """Incremental ``text/event-stream`` parser: bytes in, complete ``data`` payloads out."""

    def __init__(self) -> None:
        self.buf, self.data = b"", []

    def feed(self, chunk: bytes, final: bool = False) -> list[str]:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        if final and self.buf:
            lines, self.buf = lines + [self.buf], b""
        events = []
        for line in lines + ([b""] if final else []):
            line = line.rstrip(b"\r")
            if not line:
                if self.data:
                    events.append("\n".join(self.data))
                self.data = []
            elif line.startswith(b"data:"):
                v = line[5:]
                self.data.append((v[1:] if v.startswith(b" ") else v).decode("utf-8", "replace"))
        return events


def _error_text(obj: Any) -> str:
    err = obj.get("error") if isinstance(obj, dict) else obj
    msg = err.get("message", err) if isinstance(err, dict) else err
    return " ".join(str(msg).split())[:300]


async def send_request(session: Any, cfg: ClientConfig, req: SampleRequest, tokenizer: Any = None) -> RequestResult:
    """Stream one request; every failure ends up in ``RequestResult.error``, never raised."""
    r = RequestResult(prompt_len=req.prompt_len or 0)
    payload = build_payload(req, cfg)
    st = r.start_time = time.perf_counter()
    last_choice = last_content = None
    parts: list[str] = []
    usage: dict[str, Any] = {}

    def handle(ev: str, now: float) -> None:
        nonlocal last_choice, last_content
        if ev.strip() == "[DONE]":
            return
        data = json.loads(ev)
        if not isinstance(data, dict):
            return
        if data.get("error"):
            raise RuntimeError(f"error in stream: {_error_text(data)}")
        if choices := data.get("choices"):
            c = choices[0]
            text = (c.get("delta") or {}).get("content") if cfg.chat else c.get("text")
            if last_choice is None:  # TTFT: the first chunk with choices, as `vllm bench serve`
                r.ttft = now - st
            last_choice = now
            if text:
                if last_content is not None:
                    r.itl.append(now - last_content)
                last_content = now
                r.num_chunks += 1
                parts.append(text)
        if isinstance(data.get("usage"), dict):
            usage.update(data["usage"])

    try:
        async with session.post(cfg.base_url + cfg.endpoint, json=payload, headers=cfg.headers) as resp:
            if resp.status != 200:
                body = await resp.text()
                try:
                    body = _error_text(json.loads(body))
                except ValueError:
                    body = " ".join(body.split())[:300]
                r.error = f"HTTP {resp.status}: {body}"
                return r
            sse = _SSE()
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                for ev in sse.feed(chunk):
                    handle(ev, now)
            for ev in sse.feed(b"", final=True):
                handle(ev, time.perf_counter())
        if last_content is None:
            r.error = NO_CONTENT
            return r
        r.latency = last_choice - st
        r.generated_text = "".join(parts)
        r.server_prompt_tokens = usage.get("prompt_tokens")
        if isinstance(usage.get("completion_tokens"), int):
            r.output_tokens, r.output_len_source = usage["completion_tokens"], "usage"
        elif tokenizer is not None:
            r.output_tokens = len(tokenizer.encode(r.generated_text, add_special_tokens=False))
            r.output_len_source = "tokenizer"
        else:
            r.output_tokens, r.output_len_source = r.num_chunks, "chunks"
        if req.prompt_len is None and isinstance(r.server_prompt_tokens, int):
            r.prompt_len = r.server_prompt_tokens
        r.success = True
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        r.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    finally:
        if not r.success:
            r.latency = time.perf_counter() - st
    return r


def _session(max_concurrency: int | None) -> Any:
    try:
        import aiohttp
    except ImportError:
        raise ValueError("fleetlm bench serve needs aiohttp: pip install aiohttp") from None
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
                                 connector=aiohttp.TCPConnector(limit=max_concurrency or 0))


async def fetch_model_id(session: Any, cfg: ClientConfig) -> str:
    url = cfg.base_url + "/v1/models"
    try:
        async with session.get(url, headers=cfg.headers) as resp:
            resp.raise_for_status()
            return (await resp.json())["data"][0]["id"]
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"could not get a model id from {url} ({type(e).__name__}: {e}); pass --model") from None


async def run_benchmark(requests: list[SampleRequest], cfg: ClientConfig, *, request_rate: float = math.inf,
                        burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
                        num_warmups: int = 0, tokenizer: Any = None, disable_tqdm: bool = True,
                        warmup_pool: np.ndarray | None = None,
                        spec_out: dict | None = None) -> tuple[list[RequestResult], float]:
    """Send ``requests`` on the arrival schedule; returns the results in request order and the
    duration from the first dispatch to the last completion. Fills ``cfg.model`` if empty, and
    ``spec_out`` (if given) with the run's speculative-decoding figures from ``/metrics``."""
    from tqdm import tqdm

    from fleetlm.bench.serve_spec import fetch_spec_counters, spec_metrics

    async with _session(max_concurrency) as session:
        if not cfg.model:
            cfg.model = await fetch_model_id(session, cfg)
        rng, pool = np.random.default_rng((seed, 0x3A7)), token_pool(None) if warmup_pool is None else warmup_pool
        for i in range(num_warmups):  # random ids of their own: no prefix-cache hit for the timed run
            prompt = f"Warm-up request {i}: say hello." if cfg.chat else rng.choice(pool, 16).tolist()
            w = await send_request(session, cfg, SampleRequest(prompt, None, 4))
            if not w.success and w.error != NO_CONTENT:
                raise ValueError(f"warm-up request to {cfg.base_url + cfg.endpoint} failed: {w.error}")

        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(requests), disable=disable_tqdm)

        async def one(req: SampleRequest) -> RequestResult:
            if sem is None:
                res = await send_request(session, cfg, req, tokenizer)
            else:
                async with sem:
                    res = await send_request(session, cfg, req, tokenizer)
            bar.update(1)
            return res

        offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
        spec_before = await fetch_spec_counters(session, cfg.base_url, cfg.headers) if spec_out is not None else None
        t0 = time.perf_counter()
        tasks = []
        for req, off in zip(requests, offsets):
            if (delay := t0 + off - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
        if spec_out is not None:
            spec_out.update(spec_metrics(spec_before, await fetch_spec_counters(session, cfg.base_url, cfg.headers))
                            or {})
    return list(results), duration


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("server")
    s.add_argument("--base-url", help="server root (default http://HOST:PORT)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    s.add_argument("--model", help="model name to send (default: the first id of GET /v1/models)")
    s.add_argument("--api-key", help="sent as a Bearer token (default: $OPENAI_API_KEY)")
    s.add_argument("--tokenizer", help="GGUF file, HF directory or fleetlm alias: vocabulary for random "
                   "prompts, input lengths of text prompts, output counts when the server sends no usage")
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset-name", default="random", choices=["random", "shared-prefix", "jsonl"])
    d.add_argument("--dataset-path", help="for jsonl: one {\"prompt\": ..., \"max_tokens\": N} per line")
    d.add_argument("--num-prompts", type=int, help="requests to send (default 1000; jsonl: every line)")
    d.add_argument("--random-input-len", type=int, default=1024)
    d.add_argument("--random-output-len", "--output-len", type=int, default=128,
                   help="output tokens (random, shared-prefix; jsonl lines without max_tokens)")
    d.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [L*(1-r), L*(1+r)]; 0 = exact")
    d.add_argument("--shared-prefix-len", type=int, default=512)
    d.add_argument("--suffix-len", type=int, default=128)
    d.add_argument("--num-prefixes", type=int, default=8)
    d.add_argument("--seed", type=int, default=0, help="prompts and arrivals; the same seed sends the same "
                   "prompts, so a second run hits a prefix cache: change it between runs")
    ld = p.add_argument_group("load and sampling")
    ld.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (default inf: all at once)")
    ld.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson")
    ld.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    ld.add_argument("--num-warmups", type=int, default=1, help="untimed requests sent first (4 tokens each)")
    ld.add_argument("--temperature", type=float, default=0.0)
    ld.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true (a vLLM/fleetlm extension)")
    ld.add_argument("--extra-body", help="JSON object merged into every request body")
    ld.add_argument("--no-stream-usage", action="store_true",
                    help="do not ask for a usage chunk (output tokens then counted by --tokenizer or chunks)")
    o = p.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:3000")
    o.add_argument("--percentile-metrics", default=",".join(METRICS), help="metrics to print percentiles of")
    o.add_argument("--metric-percentiles", default="90,99", help="comma-separated, e.g. 50,90,99")
    o.add_argument("--save-result", metavar="OUT.json", help="aggregate and per-request metrics, run config")
    o.add_argument("--disable-tqdm", action="store_true")


def _config(args: argparse.Namespace) -> ClientConfig:
    if not args.request_rate > 0 or not args.burstiness > 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    extra = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as e:
            raise ValueError(f"--extra-body is not valid JSON ({e.msg})") from None
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    return ClientConfig(base, args.endpoint, args.model or "", args.api_key or os.environ.get("OPENAI_API_KEY"),
                        args.temperature, args.ignore_eos, not args.no_stream_usage, extra)


def main(args: argparse.Namespace) -> int:
    cfg = _config(args)
    percentiles = parse_percentiles(args.metric_percentiles)
    shown = parse_metric_names(args.percentile_metrics)
    slos = parse_goodput(args.goodput)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    requests = build_requests(args, tokenizer)
    if cfg.chat and any(not isinstance(r.prompt, str) for r in requests):
        raise ValueError(f"--dataset-name {args.dataset_name} makes token-id prompts, which cannot go to "
                         "/v1/chat/completions; use --endpoint /v1/completions, or a jsonl dataset of text")
    known = [r.prompt_len for r in requests if r.prompt_len is not None]
    print(f"{len(requests)} requests to {cfg.base_url + cfg.endpoint}: {sum(known)} input tokens"
          f"{'' if len(known) == len(requests) else ' (text prompts: the rest counted by the server)'}, "
          f"{sum(r.output_len for r in requests)} max output tokens; request rate {args.request_rate}, "
          f"burstiness {args.burstiness}, max concurrency {args.max_concurrency}", flush=True)
    spec: dict = {}
    results, duration = asyncio.run(run_benchmark(
        requests, cfg, request_rate=args.request_rate, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, seed=args.seed, num_warmups=args.num_warmups,
        tokenizer=tokenizer, disable_tqdm=args.disable_tqdm, warmup_pool=token_pool(tokenizer), spec_out=spec))
    metrics = calculate_metrics(results, duration, percentiles=percentiles, goodput_slos=slos)
    print(format_report(metrics, percentile_metrics=shown, percentiles=percentiles,
                        max_concurrency=args.max_concurrency, request_rate=args.request_rate))
    if spec:  # the server speculates: acceptance figures of this run
        from fleetlm.bench.serve_spec import format_spec

        print("\n".join(format_spec(spec)))
        metrics.update(spec)
    if args.save_result:
        with open(args.save_result, "w") as f:
            config = {k: v for k, v in vars(args).items() if k != "api_key" and not callable(v)}
            json.dump(result_json(config | {"base_url": cfg.base_url, "model": cfg.model}, metrics, results),
                      f, indent=2)
        print(f"saved {args.save_result}")
    return 0 if metrics["completed"] else 1
