"""Scheduler behaviour with a fake model: each sampled token is (position + 1) % 1000."""

import pytest

from fleetlm.config import CacheConfig, SchedulerConfig
from fleetlm.core.sched_output import ModelRunnerOutput
from fleetlm.core.scheduler import KVCacheCapacityError, Scheduler
from fleetlm.request import Request, RequestStatus
from fleetlm.sampling_params import SamplingParams


def make(budget=64, seqs=8, blocks=64, bs=4, max_len=256, caching=True):
    return Scheduler(SchedulerConfig(budget, seqs, max_len), CacheConfig(bs, blocks, caching))


def req(rid, n_prompt, max_tokens=4, start=0):
    return Request(rid, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens, temperature=0))


def fake_run(s: Scheduler, so):
    """Sample for requests whose known tokens are all computed after this step."""
    ids, toks = [], []
    for rid, _n in so.num_scheduled_tokens.items():
        r = s.requests[rid]
        ids.append(rid)
        toks.append([(r.num_tokens + 1) % 1000] if r.num_computed_tokens == r.num_tokens else [])
    return ModelRunnerOutput(ids, toks)


def step(s):
    so = s.schedule()
    return so, s.update_from_output(so, fake_run(s, so))


def run_all(s, limit=1000):
    outs = {}
    for _ in range(limit):
        if not s.has_unfinished_requests():
            return outs
        _, eo = step(s)
        for o in eo:
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    raise AssertionError("did not finish")


def test_budget_chunks_long_prompt_and_decodes_go_first():
    s = make(budget=16)
    s.add_request(req("short", 4, max_tokens=10))
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"short": 4}
    s.add_request(req("long", 40, start=100))
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"short": 1, "long": 15}  # decode first, prompt chunked
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"short": 1, "long": 15}
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"short": 1, "long": 10}
    assert so.total_num_scheduled_tokens <= 16


def test_fcfs_and_max_num_seqs():
    s = make(seqs=2, budget=100)
    for i in range(4):
        s.add_request(req(f"r{i}", 5, start=10 * i))
    so, _ = step(s)
    assert list(so.num_scheduled_tokens) == ["r0", "r1"]
    run_all(s)
    assert not s.requests


def test_head_of_queue_is_not_overtaken():
    s = make(blocks=6, bs=4, budget=100)
    s.add_request(req("big", 16, max_tokens=4))  # needs 5 blocks eventually, 4 now
    s.add_request(req("huge", 20, max_tokens=2, start=100))  # needs 6 blocks: not now
    s.add_request(req("small", 2, max_tokens=2, start=200))
    so, _ = step(s)
    assert list(so.num_scheduled_tokens) == ["big"]  # small waits behind huge (FCFS)


def test_preemption_recomputes_and_resumes_with_same_output():
    ref = make(blocks=200)
    for i in range(6):
        ref.add_request(req(f"r{i}", 10, max_tokens=12, start=10 * i))
    expected = run_all(ref)
    s = make(blocks=12, bs=4, budget=64)
    for i in range(6):
        s.add_request(req(f"r{i}", 10, max_tokens=12, start=10 * i))
    got = run_all(s)
    assert s.num_preemptions > 0
    assert got == expected
    assert s.kv.num_free_blocks == 12


def test_preempted_request_goes_to_head_of_queue():
    s = make(blocks=8, bs=4, budget=64)
    s.add_request(req("a", 12, max_tokens=8))
    s.add_request(req("b", 12, max_tokens=8, start=100))
    step(s)  # both prefilled: 3 blocks each, 2 left
    s.add_request(req("c", 4, max_tokens=2, start=200))
    for _ in range(8):
        so, _ = step(s)
        if s.num_preemptions:
            break
    assert s.num_preemptions >= 1
    assert s.waiting[0].request_id == "b" and s.waiting[0].status == RequestStatus.PREEMPTED
    assert s.waiting[0].num_computed_tokens == 0


def test_rejections():
    s = make(blocks=4, bs=4, max_len=64)
    with pytest.raises(ValueError, match="empty"):
        s.add_request(req("e", 0))
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request(req("l", 60, max_tokens=10))
    with pytest.raises(KVCacheCapacityError, match="can never fit"):
        s.add_request(req("kv", 17, max_tokens=1))
    assert not s.has_unfinished_requests()


def test_abort_frees_blocks_everywhere():
    s = make(blocks=16)
    s.add_request(req("a", 10, max_tokens=50))
    s.add_request(req("b", 10, max_tokens=50, start=50))
    step(s)
    s.add_request(req("w", 10, start=300))
    assert s.finish_requests(["a", "w", "zzz"]) == ["a", "w"]
    so, _ = step(s)
    assert "a" in so.finished_req_ids and list(so.num_scheduled_tokens) == ["b"]
    s.finish_requests("b")
    assert s.kv.num_free_blocks == 16 and not s.has_unfinished_requests()


def test_stop_token_ids_and_min_tokens():
    s = make()
    r = Request("x", [1, 2, 3], SamplingParams(max_tokens=20, stop_token_ids=[6], min_tokens=0))
    s.add_request(r)
    outs = run_all(s)
    # fake model samples num_tokens+1: prompt len 3 -> first token 4, then 5, 6 -> stops at 6
    assert outs["x"] == [4, 5, 6] and r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 6


def test_pipeline_steps_in_flight_take_turns_and_never_overlap_a_request():
    """pp = 2: requests split into two groups that alternate; a request in flight is never
    scheduled again, and the new tokens reach the workers in the next step that holds it."""
    s = Scheduler(SchedulerConfig(64, 8, 256, max_concurrent_batches=2), CacheConfig(4, 64, True))
    for i in range(4):
        s.add_request(req(f"r{i}", 3, max_tokens=3, start=10 * i))
    a = s.schedule()
    b = s.schedule()
    assert len(a.num_scheduled_tokens) == len(b.num_scheduled_tokens) == 2
    assert not set(a.num_scheduled_tokens) & set(b.num_scheduled_tokens)
    assert s.schedule().is_empty and not s.has_schedulable()  # everything is in flight
    s.update_from_output(a, fake_run(s, a))
    c = s.schedule()
    assert set(c.num_scheduled_tokens) == set(a.num_scheduled_tokens)  # a's group comes back
    assert all(len(r.new_token_ids) == 1 for r in c.scheduled_cached_reqs)
    assert a.step_id < b.step_id < c.step_id
