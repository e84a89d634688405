"""Per-expert Prometheus metrics (``fleetlm:moe_*``), fed by the core's ``MoEReport``.

Label cardinality is bounded: per-expert series (``moe_expert_tokens{layer, expert}``) exist only
while layers x experts <= ``MAX_EXPERT_SERIES``; past that only per-layer series are exported
(tokens, imbalance, hottest expert, dropped, rerouted), at most one per MoE layer.

``moe_layer_imbalance{layer}`` is max / mean of the per-expert load over the assignments routed
since the previous report (the current load, not the start-up average).
"""

from __future__ import annotations

from fleetlm.moe.report import MoEReport, imbalance

MAX_EXPERT_SERIES = 1024


class MoEMetrics:
    def __init__(self, registry, model_name: str) -> None:
        from prometheus_client import Counter, Gauge

        def metric(kind, name: str, doc: str, *labels: str):
            return kind(f"fleetlm:{name}", doc, labelnames=["model_name", *labels], registry=registry)

        self.model_name = model_name
        self.expert_tokens = metric(Counter, "moe_expert_tokens", "Assignments routed to each expert.",
                                    "layer", "expert")
        self.layer_tokens = metric(Counter, "moe_layer_tokens", "Assignments routed in each MoE layer.", "layer")
        self.dropped = metric(Counter, "moe_tokens_dropped", "Assignments over capacity and dropped.", "layer")
        self.rerouted = metric(Counter, "moe_tokens_rerouted", "Assignments over capacity moved to a next-best "
                               "expert.", "layer")
        self.imbalance = metric(Gauge, "moe_layer_imbalance", "Max / mean expert load since the last report.",
                                "layer")
        self.hottest = metric(Gauge, "moe_layer_hottest_expert", "Expert with the most load since the last "
                              "report.", "layer")
        self.replicas = metric(Gauge, "moe_layer_replicas", "Experts holding a redundant copy.", "layer")
        self.rank_imbalance = metric(Gauge, "moe_layer_rank_imbalance", "Max / mean expert-parallel rank load "
                                     "since the last report (after replication).", "layer")
        self._last: MoEReport | None = None

    def update(self, r: MoEReport) -> None:
        last = self._last if self._last is not None and self._last.layers == r.layers else None
        per_expert = len(r.layers) * (len(r.tokens[0]) if r.tokens else 0) <= MAX_EXPERT_SERIES
        for j, layer in enumerate(r.layers):
            lbl = (self.model_name, str(layer))
            before = last.tokens[j] if last is not None else (0,) * len(r.tokens[j])
            delta = [max(0, a - b) for a, b in zip(r.tokens[j], before)]
            self.layer_tokens.labels(*lbl).inc(sum(delta))
            if per_expert:
                for e, n in enumerate(delta):
                    if n:
                        self.expert_tokens.labels(*lbl, str(e)).inc(n)
            if sum(delta):
                self.imbalance.labels(*lbl).set(imbalance(delta))
                self.hottest.labels(*lbl).set(max(range(len(delta)), key=delta.__getitem__))
            self.dropped.labels(*lbl).inc(max(0, r.dropped[j] - (last.dropped[j] if last else 0)))
            self.rerouted.labels(*lbl).inc(max(0, r.rerouted[j] - (last.rerouted[j] if last else 0)))
            if r.replicas:
                self.replicas.labels(*lbl).set(len(r.replicas[j]))
            if r.rank_tokens and len(r.rank_tokens[j]) > 1:
                prev = last.rank_tokens[j] if last is not None and last.rank_tokens else (0,) * len(r.rank_tokens[j])
                window = [max(0, a - b) for a, b in zip(r.rank_tokens[j], prev)]
                if sum(window):
                    self.rank_imbalance.labels(*lbl).set(imbalance(window))
        self._last = r
