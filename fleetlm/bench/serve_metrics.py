"""Metrics of ``fleetlm bench serve``, defined as ``vllm bench serve`` defines them.

Per request (all times in seconds, measured with ``time.perf_counter`` by the client):
- TTFT: from sending the request to the first streamed chunk that carries choices (as
  ``vllm bench serve``; for chat this may be a role-only chunk if the server sends one early).
- ITL: the gaps between successive content chunks of one request; the ITLs of all requests
  are pooled before the statistics are taken.
- E2EL: from sending to the last chunk that carries choices (a usage-only chunk and
  ``[DONE]`` are not counted).
- TPOT: ``(E2EL - TTFT) / (output_tokens - 1)`` for a request with more than one output token;
  the statistics are over those requests.

Over the run (``duration`` = first dispatch to last completion): request throughput =
completed / duration, output throughput = output tokens / duration, total token throughput =
(input + output tokens of completed requests) / duration. Goodput = completed requests that
meet every given SLO (``metric <= slo``; a request with one output token has TPOT 0) / duration.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """What the client saw of one request."""

    success: bool = False
    prompt_len: int = 0  # input tokens (dataset's count, else the server's usage.prompt_tokens)
    output_tokens: int = 0
    output_len_source: str = ""  # "usage", "tokenizer" or "chunks"
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2EL
    start_time: float = 0.0  # perf_counter at send, for peak concurrency
    num_chunks: int = 0  # content chunks received
    server_prompt_tokens: int | None = None
    generated_text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in GOODPUT_METRICS:
            raise ValueError(f"--goodput item {item!r} must be NAME:MS with NAME one of {', '.join(GOODPUT_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput item {item!r}: {value!r} is not a number of milliseconds") from None
        if not math.isfinite(ms) or ms < 0:
            raise ValueError(f"--goodput item {item!r}: the SLO must be a finite number >= 0")
        slos[key] = ms
    return slos


def parse_percentiles(text: str) -> list[float]:
    try:
        ps = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles {text!r} must be comma-separated numbers") from None
    if not ps or any(not 0 < p <= 100 for p in ps):
        raise ValueError(f"--metric-percentiles {text!r}: each percentile must be in (0, 100]")
    return ps


def parse_metric_names(text: str) -> list[str]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"--percentile-metrics {text!r}: choose from {', '.join(METRICS)}")
    return names


def pct_label(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def is_good(r: RequestResult, slos_ms: dict[str, float]) -> bool:
    """A completed request is good when it meets every given SLO (vLLM's rule)."""
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return r.success and all(values[k] <= slo / 1000.0 for k, slo in slos_ms.items())


def peak_concurrency(results: list[RequestResult]) -> int:
    """Most requests in flight at once, from the client's send/finish times."""
    events = []
    for r in results:
        if r.start_time:
            events += [(r.start_time, 1), (r.start_time + r.latency, -1)]
    peak = cur = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):  # a finish sorts before a start
        cur += d
        peak = max(peak, cur)
    return peak


def _stats(values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    a = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
    out = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}
    for p in percentiles:
        out[f"p{pct_label(p)}"] = float(np.percentile(a, p))
    return out


def calculate_metrics(results: list[RequestResult], duration_s: float, *,
                      percentiles: list[float], goodput_slos: dict[str, float] | None = None) -> dict[str, Any]:
    """Aggregate metrics as a flat dict: ``mean_ttft_ms``, ``p99_itl_ms``, throughputs, ..."""
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    itls = [g for r in ok for g in r.itl]
    e2els = [r.latency for r in ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    dur = duration_s if duration_s > 0 else float("nan")
    m: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "max_concurrent_requests": peak_concurrency(results),
        "output_len_sources": dict(Counter(r.output_len_source for r in ok)),
        "errors_summary": dict(Counter(r.error for r in results if not r.success).most_common()),
    }
    if goodput_slos:
        good = sum(is_good(r, goodput_slos) for r in ok)
        m["good_requests"] = good
        m["request_goodput"] = good / dur
        m["goodput_slos_ms"] = dict(goodput_slos)
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        for stat, v in _stats(values, percentiles).items():
            m[f"{stat}_{name}_ms"] = v
    return m


def format_report(m: dict[str, Any], *, percentile_metrics: list[str], percentiles: list[float],
                  max_concurrency: int | None, request_rate: float) -> str:
    """The plain-text result table, laid out like vLLM's."""
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]

    def row(label: str, value: Any) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40} {text:<10}".rstrip())

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Request rate configured (RPS):", request_rate)
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    row("Peak concurrent requests:", m["max_concurrent_requests"])
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    sources = ", ".join(f"{k} {v}" for k, v in sorted(m["output_len_sources"].items()))
    row("Output token counts from:", sources or "-")
    row("Request throughput (req/s):", m["request_throughput"])
    if "request_goodput" in m:
        row("Request goodput (req/s):", m["request_goodput"])
        row("Good requests:", m["good_requests"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    for name in percentile_metrics:
        lines.append(f"{METRIC_TITLES[name]:-^50}")
        up = name.upper()
        row(f"Mean {up} (ms):", m[f"mean_{name}_ms"])
        row(f"Median {up} (ms):", m[f"median_{name}_ms"])
        row(f"Std {up} (ms):", m[f"std_{name}_ms"])
        for p in percentiles:
            row(f"P{pct_label(p)} {up} (ms):", m[f"p{pct_label(p)}_{name}_ms"])
    if m["errors_summary"]:
        lines.append(f"{'Errors':-^50}")
        for err, n in list(m["errors_summary"].items())[:5]:
            lines.append(f"{n:>6} x {err[:200]}")
        if len(m["errors_summary"]) > 5:
            lines.append(f"       ... and {len(m['errors_summary']) - 5} other error kinds")
    lines.append("=" * 50)
    return "\n".join(lines)


def result_json(config: dict[str, Any], metrics: dict[str, Any], results: list[RequestResult]) -> dict[str, Any]:
    """What ``--save-result`` writes: the run config, every aggregate metric (top level, as
    vLLM lays them out) and per-request lists in request order (times in seconds; None or 0
    for a failed request, whose error is in ``errors``)."""
    config = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in config.items()}
    t0 = min((r.start_time for r in results), default=0.0)
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "config": config,
        **metrics,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens if r.success else 0 for r in results],
        "output_len_source": [r.output_len_source for r in results],
        "server_prompt_tokens": [r.server_prompt_tokens for r in results],
        "send_times": [r.start_time - t0 for r in results],
        "ttfts": [r.ttft if r.success else None for r in results],
        "itls": [r.itl for r in results],
        "e2els": [r.latency if r.success else None for r in results],
        "tpots": [r.tpot for r in results],
        "errors": [r.error for r in results],
    }
