"""The router's Prometheus metrics (``fleetlm_router:*``), in a registry of its own."""

from __future__ import annotations

from fleetlm.router.replica import Replica

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
_PREFIX_BUCKETS = (0, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)


class RouterMetrics:
    def __init__(self, policy: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.policy = policy
        self.requests = Counter("fleetlm_router:requests", "Requests sent to each replica, by outcome.",
                                ["replica", "outcome"], registry=r)
        self.decisions = Counter("fleetlm_router:policy_decisions", "Routing decisions by policy and reason.",
                                 ["policy", "reason"], registry=r)
        self.matched_prefix = Histogram("fleetlm_router:matched_prefix_length",
                                        "Prefix the policy expected to hit (characters, or tokens when precise).",
                                        buckets=_PREFIX_BUCKETS, registry=r)
        self.retries = Counter("fleetlm_router:retries", "Requests moved to another replica before their first "
                               "token, by reason.", ["reason"], registry=r)
        self.circuit = Gauge("fleetlm_router:circuit_state", "Breaker per replica: 0 closed, 1 half-open, 2 open.",
                             ["replica"], registry=r)
        self.healthy = Gauge("fleetlm_router:replica_healthy", "1 if the last health check passed.",
                             ["replica"], registry=r)
        self.in_flight = Gauge("fleetlm_router:replica_in_flight", "Requests in flight per replica.",
                               ["replica"], registry=r)
        self.added_latency = Histogram("fleetlm_router:added_latency_seconds",
                                       "Router time before the replica gets the request (parse, route, connect).",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.stream_errors = Counter("fleetlm_router:stream_errors", "Streams ended with an error event because "
                                     "their replica failed mid-stream.", ["replica"], registry=r)
        self.disconnects = Counter("fleetlm_router:client_disconnects", "Requests the client abandoned "
                                   "(aborted on their replica).", registry=r)
        self.no_replica = Counter("fleetlm_router:no_replica", "Requests refused (503): no routable replica.",
                                  registry=r)
        # per tenant (--tenants): labelled by tenant id (from the file: bounded), never by key
        self.tenant_requests = Counter("fleetlm_router:tenant_requests", "Requests admitted, per tenant.",
                                       ["tenant"], registry=r)
        self.tenant_rate_limited = Counter("fleetlm_router:tenant_rate_limited", "Requests refused with 429 by "
                                           "the router's own buckets, per tenant and limit.", ["tenant", "limit"],
                                           registry=r)
        self.tenant_prompt_tokens = Counter("fleetlm_router:tenant_prompt_tokens", "Prompt tokens of answered "
                                            "requests (the replicas' usage), per tenant.", ["tenant"], registry=r)
        self.tenant_output_tokens = Counter("fleetlm_router:tenant_generation_tokens", "Generated tokens (the "
                                            "replicas' usage, else counted from stream chunks), per tenant.",
                                            ["tenant"], registry=r)
        self.tenant_in_flight = Gauge("fleetlm_router:tenant_in_flight", "Requests in flight, per tenant.",
                                      ["tenant"], registry=r)

    def on_tenant_admitted(self, tenant: str) -> None:
        self.tenant_requests.labels(tenant).inc()
        self.tenant_in_flight.labels(tenant).inc()

    def on_tenant_refused(self, tenant: str, limit: str) -> None:
        self.tenant_rate_limited.labels(tenant, limit).inc()

    def on_tenant_finished(self, tenant: str, prompt: int, output: int) -> None:
        """The request ended: its tokens, and its slot is free."""
        self.tenant_in_flight.labels(tenant).dec()
        if prompt > 0:
            self.tenant_prompt_tokens.labels(tenant).inc(prompt)
        if output > 0:
            self.tenant_output_tokens.labels(tenant).inc(output)

    def on_decision(self, reason: str, matched: int) -> None:
        self.decisions.labels(self.policy, reason).inc()
        if reason.startswith("prefix"):
            self.matched_prefix.observe(matched)

    def render(self, replicas: list[Replica]) -> bytes:
        from prometheus_client import generate_latest

        for rep in replicas:
            self.circuit.labels(rep.url).set(rep.breaker.state)
            self.healthy.labels(rep.url).set(1 if rep.healthy else 0)
            self.in_flight.labels(rep.url).set(rep.in_flight)
        return generate_latest(self.registry)

    def forget(self, url: str) -> None:
        for g in (self.circuit, self.healthy, self.in_flight):
            try:
                g.remove(url)
            except KeyError:
                pass
