"""spec_decode_* counters: the scheduler's stats reach /metrics with vLLM's names, and
``fleetlm bench serve`` turns two scrapes into acceptance rate and length."""

from __future__ import annotations

from fleetlm.bench.serve_spec import format_spec, parse_spec_counters, spec_metrics
from fleetlm.metrics.prometheus import PrometheusMetrics
from fleetlm.metrics.stats import SchedulerStats
from fleetlm.spec_decode.config import SpeculativeConfig
from fleetlm.spec_decode.scheduling import SpecDecodeStats, SpecScheduler, best_k, expected_tokens


def test_counters_reach_metrics_and_bench_reads_them():
    prom = PrometheusMetrics("m")
    prom.on_scheduler_stats(SchedulerStats(spec_num_drafts=4, spec_num_draft_tokens=12, spec_num_accepted_tokens=6,
                                           spec_accepted_per_pos=(3, 2, 1)))
    before = parse_spec_counters(prom.render().decode())
    prom.on_scheduler_stats(SchedulerStats(spec_num_drafts=14, spec_num_draft_tokens=42, spec_num_accepted_tokens=26,
                                           spec_accepted_per_pos=(10, 9, 7)))
    text = prom.render().decode()
    assert 'fleetlm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="2"} 7.0' in text
    m = spec_metrics(before, parse_spec_counters(text))
    assert m["spec_num_drafts"] == 10 and m["spec_num_draft_tokens"] == 30 and m["spec_num_accepted_tokens"] == 20
    assert m["spec_acceptance_rate"] == 20 / 30
    assert m["spec_mean_acceptance_length"] == 3.0
    assert m["spec_acceptance_per_pos"] == [0.7, 0.7, 0.6]
    assert any("Acceptance length:" in line for line in format_spec(m))
    assert parse_spec_counters("fleetlm:prefix_cache_hits_total 3.0\n") is None


def test_stats_definitions():
    s = SpecDecodeStats(accepted_per_pos=[0, 0, 0])
    s.record(3, 3)
    s.record(3, 0)
    s.record(2, 1)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens, s.accepted_per_pos) == (3, 8, 4, [2, 1, 1])
    assert s.acceptance_rate == 0.5 and s.mean_acceptance_length == 1 + 4 / 3


def test_adaptive_rule():
    assert expected_tokens(0.0, 3) == 1.0 and expected_tokens(1.0, 3) == 4.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12
    # batch 1, memory bound: free drafts are worth it at any acceptance > 0
    assert best_k(0.6, 1, 4, knee=100, draft_cost=0.0) == 4
    # a big batch is compute bound: each draft costs nearly a step, only a high acceptance pays
    assert best_k(0.3, 64, 4, knee=100, draft_cost=0.0) == 0
    assert best_k(0.95, 64, 4, knee=100, draft_cost=0.0) >= 1
    assert best_k(0.5, 16, 4, knee=100, draft_cost=0.0) == 2  # E/C: 1.32, 1.37, 1.33, 1.25 for k = 1..4
    # each multi-token query is its own attention segment (0.17 of a step here): measured at
    # batch 16 with acceptance 0.68, speculation cost throughput, and the rule now says off
    assert best_k(0.68, 16, 4, knee=100, draft_cost=0.0, segment_cost=0.17) == 0
    assert best_k(0.78, 1, 4, knee=100, draft_cost=0.0, segment_cost=0.17) == 4
    # an expensive draft with poor acceptance never pays
    assert best_k(0.1, 1, 4, knee=100, draft_cost=0.5) == 0


def test_adaptive_scheduler_turns_off_and_probes():
    sched = SpecScheduler(SpeculativeConfig("ngram", 4), draft_cost=0.0)
    assert sched.step_k(1) == 4
    sched.acceptance = 0.0  # measured: nothing is ever accepted
    ks = [sched.step_k(64) for _ in range(64)]
    assert ks.count(0) == 62 and ks.count(1) == 2  # off, with a one-draft probe every 32 steps
    # the drafts a probe brings back are verified by PROBE_REQUESTS requests only
    from fleetlm.request import Request
    from fleetlm.sampling_params import SamplingParams
    from fleetlm.spec_decode.scheduling import PROBE_REQUESTS

    reqs = [Request(str(i), [1, 2, 3], SamplingParams(max_tokens=50)) for i in range(16)]
    for r in reqs:
        r.num_computed_tokens = 2  # one token to compute: a decode
    while sched.step_k(16) != 1:
        pass
    for r in reqs:
        sched.on_output(r, [7], [8])
    assert sum(bool(sched.drafts_for(r, 100, 1000)) for r in reqs) == PROBE_REQUESTS
    sched.step_k(16)  # the next step: not a probe
    for r in reqs:
        sched.on_output(r, [7], [8])
    assert sum(bool(sched.drafts_for(r, 100, 1000)) for r in reqs) == 16  # not a probe's: no limit
    off = SpecScheduler(SpeculativeConfig("ngram", 4, disable_by_batch_size=8), draft_cost=0.0)
    assert off.step_k(8) == 0 and off.step_k(2) > 0
