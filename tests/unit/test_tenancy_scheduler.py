"""Multi-tenant serving in the engine core (issue 15): salted prefix cache, FCFS with priority,
and the fair (VTC) policy, on the real ``Scheduler`` with a fake model. Service shares are
counted from what the scheduler schedules, never from the policy's own counters."""

from __future__ import annotations

import pytest

from fleetlm.config import CacheConfig, SchedulerConfig
from fleetlm.core.block_pool import prompt_block_hashes
from fleetlm.core.fair_queue import FairQueue, make_waiting_queue
from fleetlm.core.sched_output import ModelRunnerOutput
from fleetlm.core.scheduler import Scheduler
from fleetlm.request import Request, Tenancy
from fleetlm.sampling_params import SamplingParams

PROMPT_COST, OUTPUT_COST = 1, 2


def make(policy="fcfs", budget=256, seqs=4, blocks=2048, bs=4, max_len=512):
    return Scheduler(SchedulerConfig(budget, seqs, max_len, scheduling_policy=policy), CacheConfig(bs, blocks, True))


def req(rid, n_prompt=16, max_tokens=16, start=0, **tenancy):
    return Request(rid, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens, temperature=0),
                   tenancy=Tenancy(**tenancy))


def step(s: Scheduler):
    so = s.schedule()
    ids, toks = [], []
    for rid in so.num_scheduled_tokens:
        r = s.requests[rid]
        ids.append(rid)
        toks.append([7] if r.num_computed_tokens == r.num_tokens else [])
    s.kv.commit(so.step_id)
    return so, s.update_from_output(so, ModelRunnerOutput(ids, toks))


def service_of(s: Scheduler, so) -> dict[str, float]:
    """Cost-weighted service per tenant in a scheduled step (before update_from_output)."""
    out: dict[str, float] = {}
    for rid, n in so.num_scheduled_tokens.items():
        r = s.requests[rid]
        end = r.num_computed_tokens  # already advanced by n
        prompt = max(0, min(end, r.num_prompt_tokens) - (end - n))
        sample = 1 if end == r.num_tokens else 0
        out[r.tenancy.tenant_id] = out.get(r.tenancy.tenant_id, 0) + prompt * PROMPT_COST + sample * OUTPUT_COST
    return out


def run_until_drained(s: Scheduler, limit=10000):
    for _ in range(limit):
        if not s.has_unfinished_requests():
            return
        step(s)
    raise AssertionError("did not finish")


# -- cache isolation --------------------------------------------------------------------------------
def test_another_tenants_identical_prompt_gets_no_hits_and_computes_cold():
    s = make()
    s.add_request(req("a1", 64, 1, cache_salt="salt-a"))
    run_until_drained(s)
    hits_before = s.kv.stats.hits
    s.add_request(req("b1", 64, 1, cache_salt="salt-b"))
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"b1": 64}  # every prompt token computed, like a cold prompt
    assert s.kv.stats.hits == hits_before
    s.add_request(req("a2", 64, 1, cache_salt="salt-a"))
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"a2": 4}  # the owner still hits its own 60 tokens
    s.add_request(req("n1", 64, 1))  # no salt at all: private from both
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"n1": 64}


def test_shared_named_prefix_is_hit_by_both_tenants_but_not_beyond():
    s = make()
    shared = dict(shared_prefix_tokens=32, shared_salt="public-system-prompt")
    s.add_request(req("a", 64, 1, cache_salt="salt-a", **shared))
    run_until_drained(s)
    s.add_request(req("b", 64, 1, cache_salt="salt-b", **shared))
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"b": 32}  # the 32 shared tokens hit, A's private ones do not
    s.add_request(req("c", 64, 1, cache_salt="salt-c"))  # did not opt in: nothing
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"c": 64}


def test_salted_hashes_are_what_routers_compute():
    s = make()
    t = dict(cache_salt="s1", shared_prefix_tokens=8, shared_salt="pub")
    r = req("a", 20, 1, **t)
    s.add_request(r)
    step(s)
    assert r.block_hashes == prompt_block_hashes(r.prompt_token_ids, 4, "s1", 8, "pub")
    assert prompt_block_hashes(r.prompt_token_ids, 4, "s2", 8, "pub")[:2] == r.block_hashes[:2]
    assert prompt_block_hashes(r.prompt_token_ids, 4, "s2", 8, "pub")[2:] != r.block_hashes[2:]
    assert prompt_block_hashes(r.prompt_token_ids, 4) != r.block_hashes


# -- FCFS with priority -----------------------------------------------------------------------------
def test_fcfs_priority_orders_admission_and_equal_priorities_stay_fcfs():
    s = make(seqs=1)
    for rid, prio in (("late-low", 5), ("first", 0), ("second", 0), ("urgent", -1)):
        s.add_request(req(rid, 4, 1, priority=prio))
    order = []
    while s.has_unfinished_requests():
        so, _ = step(s)
        order += [r for r in so.num_scheduled_tokens if r not in order]
    assert order == ["urgent", "first", "second", "late-low"]


def test_unknown_policy_is_a_value_error():
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_waiting_queue("lottery")


# -- fairness ---------------------------------------------------------------------------------------
def flood(s: Scheduler, n_a=100, n_b=10, w_a=1.0, w_b=1.0):
    for i in range(n_a):
        s.add_request(req(f"a{i}", start=i, tenant_id="A", weight=w_a))
    for i in range(n_b):
        s.add_request(req(f"b{i}", start=1000 + i, tenant_id="B", weight=w_b))


def shares_while_both_backlogged(s: Scheduler) -> dict[str, float]:
    total: dict[str, float] = {"A": 0, "B": 0}
    while any(r.tenancy.tenant_id == "B" for r in s.waiting):
        so = s.schedule()
        for t, v in service_of(s, so).items():
            total[t] += v
        ids = list(so.num_scheduled_tokens)
        toks = [[7] if s.requests[r].num_computed_tokens == s.requests[r].num_tokens else [] for r in ids]
        s.kv.commit(so.step_id)
        s.update_from_output(so, ModelRunnerOutput(ids, toks))
    return {t: v / sum(total.values()) for t, v in total.items()}


@pytest.mark.parametrize("w_a,w_b", [(1, 1), (3, 1)])
def test_fair_share_follows_weights_when_one_tenant_floods(w_a, w_b):
    s = make("fair")
    flood(s, w_a=w_a, w_b=w_b)
    shares = shares_while_both_backlogged(s)
    want = w_b / (w_a + w_b)
    assert abs(shares["B"] - want) <= 0.1 * want, shares


def test_fcfs_starves_the_light_tenant_behind_a_flood():
    s = make("fcfs")
    flood(s, n_a=40)
    while s.has_unfinished_requests():  # the bug the fair policy fixes: B waits for all of A
        so, _ = step(s)
        if any(r.startswith("b") for r in so.num_scheduled_tokens):
            assert not any(r.tenancy.tenant_id == "A" for r in s.waiting)


def test_fair_is_work_conserving_when_the_other_tenant_is_idle():
    schedules = {}
    for policy in ("fcfs", "fair"):
        s = make(policy)
        for i in range(30):
            s.add_request(req(f"a{i}", start=i, tenant_id="A"))
        schedules[policy] = []
        while s.has_unfinished_requests():
            so, _ = step(s)
            schedules[policy].append(so.num_scheduled_tokens)
    assert schedules["fair"] == schedules["fcfs"]  # A alone gets the whole engine, step for step
    assert max(len(x) for x in schedules["fair"]) == 4


def test_fair_inside_a_tenant_is_fcfs_with_priority():
    s = make("fair", seqs=1)
    s.add_request(req("x", 4, 1, tenant_id="A"))
    s.add_request(req("y", 4, 1, tenant_id="A", priority=-3))
    s.add_request(req("z", 4, 1, tenant_id="A"))
    order = []
    while s.has_unfinished_requests():
        so, _ = step(s)
        order += [r for r in so.num_scheduled_tokens if r not in order]
    assert order == ["y", "x", "z"]


def test_returning_tenant_banks_no_credit_for_idle_time():
    q = FairQueue()
    s = make("fair")
    s.waiting = q
    for i in range(20):
        s.add_request(req(f"a{i}", start=i, tenant_id="A"))
    for _ in range(40):
        step(s)
    assert q.counters["A"] > 100
    s.add_request(req("b0", tenant_id="B"))
    assert q.counters["B"] == pytest.approx(q.counters["A"])  # lifted to the backlog's level, not 0


def test_preemption_victim_comes_from_the_tenant_furthest_over_its_share():
    # 12 blocks of 4 tokens; A has been served a lot, B little. B's request was admitted last,
    # yet when blocks run out the victim is A's.
    s = make("fair", blocks=12, seqs=3)
    s.add_request(req("a0", 8, 12, start=0, tenant_id="A"))
    s.add_request(req("a1", 8, 12, start=100, tenant_id="A"))
    step(s)
    s.add_request(req("b0", 4, 12, start=200, tenant_id="B"))
    for _ in range(12):
        step(s)
        if s.num_preemptions:
            break
    assert s.num_preemptions >= 1
    assert s.waiting.preemptions.get("A", 0) >= 1 and s.waiting.preemptions.get("B", 0) == 0
    run_until_drained(s)


def test_fair_charges_computed_prompt_and_sampled_tokens_never_hits_or_recompute():
    q = FairQueue()
    r = req("r", 20, 8, tenant_id="A", weight=2.0)
    q.append(r)
    q.popleft()
    r.num_computed_tokens = 8  # 8 prompt tokens were prefix hits: free
    q.charge(r, 6)  # a chunk: 6 prompt tokens, no sample
    assert q.service["A"] == 6
    r.num_computed_tokens = 14
    q.charge(r, 6)  # the rest of the prompt and the first sample
    assert q.service["A"] == 12 + 2
    r.num_computed_tokens = 20
    r.output_token_ids = [5]
    q.charge(r, 1)  # a decode
    assert q.service["A"] == 12 + 4 and q.counters["A"] == pytest.approx(16 / 2)
    r.output_token_ids = [5, 6]
    r.num_computed_tokens = 0  # preempted: the recompute of 21 positions samples one new token
    q.charge(r, 22)
    assert q.service["A"] == 12 + 6
    r.num_computed_tokens = 22
    r.output_token_ids = [5, 6, 7]
    q.charge(r, 1 + 3)  # a decode with 3 speculative drafts: 4 sampling positions
    assert q.service["A"] == 12 + 6 + 8
