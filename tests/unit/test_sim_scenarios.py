"""Small fleets whose answers are known by hand: exact TTFT, TPOT, ITL and E2EL."""

import numpy as np
import pytest

from fleetlm.sim import Arrivals, EngineLimits, FleetConfig, fixed_profile, simulate
from fleetlm.sim.profile import Profile
from fleetlm.sim.step_model import TableStepModel

MS = 1e-3


def arrivals(*reqs, group=None, prefix_len=None):
    """reqs: (time_s, input_len, output_len)."""
    n = len(reqs)
    t, i, o = (np.array([r[k] for r in reqs]) for k in range(3))
    g = np.array(group if group is not None else [-1] * n)
    p = np.array(prefix_len if prefix_len is not None else [0] * n)
    return Arrivals(t.astype(float), i, o, g, p, np.full(n, -1))


def per_request(res):
    """(ttft, e2el, tpot) in ms per request, in arrival order."""
    return [(round(r.ttft / MS, 6), round(r.latency / MS, 6), None if r.tpot is None else round(r.tpot / MS, 6))
            for r in res.results]


def run(arr, step_ms=10.0, limits=None, **fleet):
    return simulate(fixed_profile(step_ms * MS, limits), FleetConfig(**fleet), arr)


def test_one_request_prefill_then_decodes():
    res = run(arrivals((0.0, 100, 5)))
    assert per_request(res) == [(10.0, 50.0, 10.0)]  # prefill step gives token 1, then 4 decodes
    assert res.results[0].itl == pytest.approx([0.01] * 4)
    assert res.metrics["completed"] == 1 and res.metrics["total_output_tokens"] == 5


def test_arrival_during_a_step_waits_for_the_next():
    # A's prefill runs 0-10 ms; B arrives at 5 ms and is scheduled with A's first decode at 10.
    res = run(arrivals((0.0, 100, 3), (0.005, 50, 2)))
    assert per_request(res) == [(10.0, 30.0, 10.0), (15.0, 25.0, 10.0)]


def test_chunked_prefill_takes_one_step_per_chunk():
    res = run(arrivals((0.0, 200, 2)), limits=EngineLimits(max_num_batched_tokens=64))
    assert per_request(res) == [(40.0, 50.0, 10.0)]  # chunks 64, 64, 64, 8


def test_max_num_seqs_queues_the_second_request():
    res = run(arrivals((0.0, 10, 3), (0.0, 10, 2)), limits=EngineLimits(max_num_seqs=1))
    assert per_request(res) == [(10.0, 30.0, 10.0), (40.0, 50.0, 10.0)]


def test_step_time_follows_the_profile():
    # base(tokens) = 5 ms + 0.1 ms per token: the 100-token prefill takes 15 ms, a decode 5.1 ms.
    prof = Profile("m", "none", "fixed", TableStepModel((1.0, 2.0), (5.1 * MS, 5.2 * MS)))
    res = simulate(prof, FleetConfig(), arrivals((0.0, 100, 3)))
    assert per_request(res) == [(15.0, 25.2, 5.1)]


def test_frontend_latency_adds_to_ttft_and_e2el_only():
    from dataclasses import replace

    prof = replace(fixed_profile(10 * MS), frontend_s=2 * MS)
    res = simulate(prof, FleetConfig(), arrivals((0.0, 100, 5)))
    assert per_request(res) == [(12.0, 52.0, 10.0)]


def test_round_robin_spreads_and_batches():
    res = run(arrivals(*[(0.0, 16, 2)] * 4), replicas=2, router="round_robin")
    assert per_request(res) == [(10.0, 20.0, 10.0)] * 4  # two per replica, batched together


def test_least_load_avoids_the_busy_replica():
    # A holds replica 0 for 200 ms; B is done on replica 1 at 11 ms; C arrives at 55 ms.
    reqs = [(0.0, 16, 20), (0.001, 16, 1), (0.055, 16, 2)]
    rr = per_request(run(arrivals(*reqs), replicas=2, router="round_robin"))
    ll = per_request(run(arrivals(*reqs), replicas=2, router="least_load"))
    assert rr[2] == (15.0, 25.0, 10.0)  # back on replica 0: joins its step starting at 60 ms
    assert ll[2] == (10.0, 20.0, 10.0)  # idle replica 1 starts at once
    assert rr[0] == ll[0] == (10.0, 200.0, 10.0)


def test_prefix_cache_hit_shortens_the_second_prefill():
    # Both share a 64-token group prefix; B (arriving after A's prefill) hits it: with a budget
    # of 32 tokens A needs 3 chunks (32, 32, 16) but B only its own 16 tokens plus the last block.
    limits = EngineLimits(max_num_batched_tokens=32)
    res = run(arrivals((0.0, 80, 2), (0.030, 80, 2), group=[0, 0], prefix_len=[64, 64]), limits=limits)
    assert per_request(res)[0] == (30.0, 40.0, 10.0)
    assert per_request(res)[1] == (10.0, 20.0, 10.0)  # one step: 16 own tokens, 64 from the cache
    assert res.scheduler["prefix_hits"] == 64


def test_pd_adds_the_kv_transfer_between_first_and_second_token():
    from dataclasses import replace

    prof = replace(fixed_profile(10 * MS), kv_bytes_per_token=1000)
    cfg = FleetConfig(replicas=2, prefill_replicas=1, kv_bandwidth=1e6, kv_latency_s=0.0)
    res = simulate(prof, cfg, arrivals((0.0, 100, 3)))
    # first token at 10 ms on the prefill worker; 100 tokens x 1000 B at 1 MB/s = 100 ms; the
    # decode worker's first step (prompt K/V already there) gives token 2 at 120, token 3 at 130.
    assert per_request(res) == [(10.0, 130.0, 60.0)]
    assert res.results[0].itl == pytest.approx([0.110, 0.010])


def test_preemption_recomputes_and_still_finishes():
    # 6 blocks of 16 tokens: two 40-token prompts growing to 60 tokens cannot both stay.
    limits = EngineLimits(block_size=16, num_blocks=6, max_num_batched_tokens=256)
    res = run(arrivals((0.0, 40, 20), (0.0, 40, 20)), limits=limits)
    assert res.metrics["completed"] == 2 and res.scheduler["preemptions"] >= 1
    assert all(r.output_tokens == 20 for r in res.results)


def test_too_long_request_fails_alone():
    res = run(arrivals((0.0, 100, 5), (0.0, 9000, 5)))
    assert res.metrics["completed"] == 1 and res.metrics["failed"] == 1
    assert "max_model_len" in res.results[1].error


def test_warmup_requests_are_not_measured():
    res = run(arrivals((0.0, 10, 2), (1.0, 10, 2)), warmup_s=0.5)
    assert res.metrics["completed"] == 1 and per_request(res) == [(10.0, 20.0, 10.0)]


def test_timeline_counts_utilisation_and_queue():
    res = run(arrivals(*[(0.0, 16, 50)] * 2), limits=EngineLimits(max_num_seqs=1), timeline_interval_s=0.25)
    rows = res.timeline.rows
    assert rows[0]["all_utilisation"] == pytest.approx(1.0)
    assert rows[0]["all_running"] == 1 and rows[0]["all_waiting"] == 1
    assert rows[-1]["t_s"] >= 0.75


def test_prefix_router_keeps_a_group_on_one_replica():
    # Four requests of one 64-token group, one after another on an idle 2-replica fleet: the
    # prefix router sends all to the replica that has the prefix (3 hits of 64 tokens); least
    # load alternates (the second replica must compute the prefix once: 2 hits).
    reqs = [(0.1 * k, 80, 2) for k in range(4)]
    kw = dict(group=[0] * 4, prefix_len=[64] * 4)
    pre = run(arrivals(*reqs, **kw), replicas=2, router="prefix")
    ll = run(arrivals(*reqs, **kw), replicas=2, router="least_load")
    assert pre.scheduler["prefix_hits"] == 3 * 64
    assert ll.scheduler["prefix_hits"] == 2 * 64


def test_prefix_router_spills_over_when_its_replica_is_loaded():
    from fleetlm.sim.router import BALANCE_ABS, Router

    r = Router("prefix", 2)
    assert r.pick(7, [0, 0]) == 0
    assert r.pick(7, [BALANCE_ABS, 0]) == 0  # within the slack: stays for the cache
    assert r.pick(7, [BALANCE_ABS + 1, 0]) == 1  # overloaded: least load, and remembered
    assert r.pick(7, [0, 0]) == 1


def test_pipeline_parallel_keeps_two_steps_in_flight():
    # pp=2, steps of 10 ms (5 ms per stage), budget 64: A and B (64-token prompts) cannot share
    # a step, so B's prefill enters stage 0 at 5 ms, behind A's; each then decodes in its own
    # step, one stage apart: A at 10, 20, 30 ms, B at 15, 25, 35 ms.
    from dataclasses import replace

    prof = replace(fixed_profile(10 * MS, EngineLimits(max_num_batched_tokens=64)), pp=2)
    res = simulate(prof, FleetConfig(), arrivals((0.0, 64, 3), (0.0, 64, 3)))
    assert per_request(res) == [(10.0, 30.0, 10.0), (15.0, 35.0, 10.0)]
    seq = run(arrivals((0.0, 64, 3), (0.0, 64, 3)), limits=EngineLimits(max_num_batched_tokens=64))
    assert per_request(seq) == [(10.0, 30.0, 10.0), (30.0, 50.0, 10.0)]  # one step at a time


def test_pipeline_parallel_groups_take_turns():
    # pp=2: the scheduler gives each step half the requests, so A, B and C, D alternate stages.
    from dataclasses import replace

    prof = replace(fixed_profile(10 * MS), pp=2)
    res = simulate(prof, FleetConfig(), arrivals(*[(0.0, 16, 3)] * 4))
    assert per_request(res) == [(10.0, 30.0, 10.0)] * 2 + [(15.0, 35.0, 10.0)] * 2
