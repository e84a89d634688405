"""Prometheus metrics of one server, named ``fleetlm:*``, in their own registry.

Request latencies are measured in the front end, on the same clock and at the same points a
client sees them (arrival = the HTTP handler starts; a token counts when the front end has it):

- ``time_to_first_token_seconds``: arrival -> first generated token.
- ``inter_token_latency_seconds``: gap between successive steps that gave a request new tokens.
- ``request_time_per_output_token_seconds``: per finished request, (last token - first token)
  / (generated tokens - 1), over all of its samples' tokens.
- ``e2e_request_latency_seconds``: arrival -> finished.
- ``request_queue_time_seconds``: arrival -> first scheduled by the engine core.

Scheduler gauges and counters come from the core's cumulative ``SchedulerStats``; prefix-cache
queries and hits count prompt tokens at a request's first admission only, so a preempted
request finding its own blocks again is not counted as reuse.
"""

from __future__ import annotations

from fleetlm.metrics.stats import SchedulerStats
from fleetlm.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                      5.0, 10.0, 20.0)


class PrometheusMetrics:
    """Implements ``StatsSink`` (for ``OutputProcessor``) plus scheduler and HTTP hooks."""

    def __init__(self, model_name: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        lbl = {"labelnames": ["model_name"], "registry": r}

        def hist(name: str, doc: str, buckets) -> object:
            return Histogram(f"fleetlm:{name}", doc, buckets=buckets, **lbl).labels(model_name)

        def gauge(name: str, doc: str) -> object:
            return Gauge(f"fleetlm:{name}", doc, **lbl).labels(model_name)

        def counter(name: str, doc: str) -> object:
            return Counter(f"fleetlm:{name}", doc, **lbl).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first generated token.", _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Gap between steps that gave a request new tokens.",
                        _TOKEN_GAP_BUCKETS)
        self.tpot = hist("request_time_per_output_token_seconds",
                         "Per request: (last token - first token) / (generated tokens - 1).", _TOKEN_GAP_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.", _LATENCY_BUCKETS)
        self.running = gauge("num_requests_running", "Sequences running in the engine core.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks held by live sequences (0-1).")
        self.kv_free = gauge("kv_cache_free_blocks", "KV blocks no live sequence holds.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens served from the prefix cache, not computed.")
        self.preemptions = counter("num_preemptions", "Sequences preempted (freed, to be recomputed).")
        self.failed_steps = counter("engine_failed_steps", "Steps that raised and were retried per request.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of accepted requests (times n).")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.spec_drafts = counter("spec_decode_num_drafts", "Speculative drafts (one request's draft tokens in one step).")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed and verified.")
        self.spec_accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self._spec_per_pos = Counter("fleetlm:spec_decode_num_accepted_tokens_per_pos",
                                     "Accepted draft tokens by position in the draft (0-based).",
                                     labelnames=["model_name", "position"], registry=r)
        self._success = Counter("fleetlm:request_success", "Finished requests by finish reason.",
                                labelnames=["model_name", "finished_reason"], registry=r)
        self._http = Counter("fleetlm:http_responses", "HTTP responses by status code.",
                             labelnames=["model_name", "status"], registry=r)
        self.model_name = model_name
        self._last = SchedulerStats()
        self.tenants = None  # per-tenant metrics (fleetlm/tenancy/metrics.py), set with --tenants
        self.moe = None  # per-expert metrics (fleetlm/moe/metrics.py), on the first MoE report

    # -- StatsSink ----------------------------------------------------------------------------
    def on_request_added(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_first_token(self, ttft: float) -> None:
        self.ttft.observe(ttft)

    def on_inter_token(self, gap: float) -> None:
        self.itl.observe(gap)

    def on_new_tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def on_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        if m.e2e_latency is not None:
            self.e2e.observe(m.e2e_latency)
        if m.time_in_queue is not None:
            self.queue.observe(max(0.0, m.time_in_queue))
        n_tokens = sum(len(c.token_ids) for c in out.outputs)
        if n_tokens > 1 and m.first_token_time is not None and m.last_token_time is not None:
            self.tpot.observe((m.last_token_time - m.first_token_time) / (n_tokens - 1))
        for c in out.outputs:
            self._success.labels(self.model_name, c.finish_reason or "abort").inc()

    # -- engine core and HTTP -------------------------------------------------------------------
    def on_scheduler_stats(self, s: SchedulerStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_cache_usage)
        self.kv_free.set(s.num_free_blocks)
        last = self._last
        self.prefix_queries.inc(max(0, s.prefix_queries - last.prefix_queries))
        self.prefix_hits.inc(max(0, s.prefix_hits - last.prefix_hits))
        self.preemptions.inc(max(0, s.num_preemptions - last.num_preemptions))
        self.failed_steps.inc(max(0, s.num_failed_steps - last.num_failed_steps))
        self._on_spec_stats(s, last)
        self._last = s
        if self.tenants is not None:
            self.tenants.on_scheduler_stats(s)
        if s.moe is not None:
            if self.moe is None:
                from fleetlm.moe.metrics import MoEMetrics

                self.moe = MoEMetrics(self.registry, self.model_name)
            self.moe.update(s.moe)

    def _on_spec_stats(self, s: SchedulerStats, last: SchedulerStats) -> None:
        self.spec_drafts.inc(max(0, s.spec_num_drafts - last.spec_num_drafts))
        self.spec_draft_tokens.inc(max(0, s.spec_num_draft_tokens - last.spec_num_draft_tokens))
        self.spec_accepted.inc(max(0, s.spec_num_accepted_tokens - last.spec_num_accepted_tokens))
        for j, n in enumerate(s.spec_accepted_per_pos):
            before = last.spec_accepted_per_pos[j] if j < len(last.spec_accepted_per_pos) else 0
            self._spec_per_pos.labels(self.model_name, str(j)).inc(max(0, n - before))

    def on_http_response(self, status: int) -> None:
        self._http.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
