"""Per-tenant Prometheus metrics, labelled ``tenant`` by tenant id (ids come from the tenants
file, so the label's cardinality is bounded; a key never appears)."""

from __future__ import annotations

from fleetlm.metrics.stats import SchedulerStats
from fleetlm.outputs import RequestOutput

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)


class TenantMetrics:
    def __init__(self, registry, model_name: str) -> None:
        from prometheus_client import Counter, Histogram

        lbl = {"labelnames": ["model_name", "tenant"], "registry": registry}
        self.model_name = model_name
        self.requests = Counter("fleetlm:tenant_requests", "Requests admitted, per tenant.", **lbl)
        self.prompt_tokens = Counter("fleetlm:tenant_prompt_tokens", "Prompt tokens admitted (times n).", **lbl)
        self.output_tokens = Counter("fleetlm:tenant_generation_tokens", "Generated tokens.", **lbl)
        self.cache_hits = Counter("fleetlm:tenant_prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                  **lbl)
        self.rate_limited = Counter("fleetlm:tenant_rate_limited", "Requests refused with 429 (quota or queue).",
                                    **lbl)
        self.preemptions = Counter("fleetlm:tenant_preemptions", "Sequences preempted, per tenant.", **lbl)
        self.ttft = Histogram("fleetlm:tenant_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_BUCKETS, **lbl)
        self.queue = Histogram("fleetlm:tenant_request_queue_time_seconds", "Arrival to first scheduled.",
                               buckets=_BUCKETS, **lbl)
        self._preempted: dict[str, int] = {}

    def _l(self, tenant: str):
        return {"model_name": self.model_name, "tenant": tenant or "none"}

    def on_admitted(self, tenant: str, num_seqs: int, num_prompt_tokens: int) -> None:
        self.requests.labels(**self._l(tenant)).inc()
        self.prompt_tokens.labels(**self._l(tenant)).inc(num_prompt_tokens * num_seqs)

    def on_rate_limited(self, tenant: str) -> None:
        self.rate_limited.labels(**self._l(tenant)).inc()

    def on_tokens(self, tenant: str, n: int) -> None:
        if n:
            self.output_tokens.labels(**self._l(tenant)).inc(n)

    def on_finished(self, tenant: str, out: RequestOutput) -> None:
        m = out.metrics
        if m.first_token_time is not None:
            self.ttft.labels(**self._l(tenant)).observe(max(0.0, m.first_token_time - m.arrival_time))
        if m.first_scheduled_time is not None:
            self.queue.labels(**self._l(tenant)).observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        if out.num_cached_tokens:
            self.cache_hits.labels(**self._l(tenant)).inc(out.num_cached_tokens)

    def on_scheduler_stats(self, s: SchedulerStats) -> None:
        for tenant, n in (s.tenant_preemptions or {}).items():
            last = self._preempted.get(tenant, 0)
            if n > last:
                self.preemptions.labels(**self._l(tenant)).inc(n - last)
                self._preempted[tenant] = n
