"""Simulated and real scheduling agree: the same arrivals through the engine's ``Scheduler``
driven by the engine core's loop (drain inputs, step) with a fake executor of fixed step time,
and through ``fleetlm sim``, give the same per-request token timelines."""

import numpy as np
import pytest

from fleetlm.core.sched_output import ModelRunnerOutput
from fleetlm.core.scheduler import Scheduler
from fleetlm.request import Request
from fleetlm.sampling_params import SamplingParams
from fleetlm.sim import Arrivals, EngineLimits, FleetConfig, FleetSim, fixed_profile
from fleetlm.sim.replica import SAMPLED_TOKEN
from fleetlm.sim.workload import PromptFactory

STEP_S = 0.01


def reference_timelines(arr: Arrivals, limits: EngineLimits) -> dict[str, list[float]]:
    """The engine core's loop on simulated time: add every request that has arrived, run one
    step (schedule, fake execute, commit, update), advance the clock by the step time."""
    sched = Scheduler(*limits.configs())
    prompts = PromptFactory(SAMPLED_TOKEN)
    times, t, i, n = arr.t.tolist(), 0.0, 0, len(arr)
    lines: dict[str, list[float]] = {}
    while i < n or sched.has_unfinished_requests():
        if not sched.has_unfinished_requests():
            t = max(t, times[i])
        while i < n and times[i] <= t:
            out = int(arr.output_len[i])
            p = prompts.prompt(i, int(arr.input_len[i]), out, int(arr.group[i]), int(arr.prefix_len[i]),
                               int(arr.session[i]))
            lines[str(i)] = []
            try:
                sched.add_request(Request(str(i), p, SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)))
            except ValueError:  # can never fit: rejected, no tokens (as the simulator)
                pass
            i += 1
        so = sched.schedule()
        ids = list(so.num_scheduled_tokens)
        toks = [[SAMPLED_TOKEN] if sched.requests[r].num_computed_tokens == sched.requests[r].num_tokens else []
                for r in ids]
        t += STEP_S
        sched.kv.commit(so.step_id)  # as EngineCore.step after a successful forward
        for o in sched.update_from_output(so, ModelRunnerOutput(ids, toks)):
            lines[o.request_id] += [t] * len(o.new_token_ids)
    return lines


def sim_timelines(arr: Arrivals, limits: EngineLimits) -> dict[str, list[float]]:
    sim = FleetSim(fixed_profile(STEP_S, limits), FleetConfig(), arr)
    lines: dict[str, list[float]] = {}
    rec_token = sim.rec.token

    def token(i: int, t: float) -> None:
        lines.setdefault(str(i), []).append(t)
        rec_token(i, t)

    sim.rec.token = token
    res = sim.run()
    for i, r in enumerate(res.results):
        if not r.success:
            assert "KV" in r.error or "max_model_len" in r.error
            lines[str(i)] = []
    return lines


def workload(seed: int, n: int = 60) -> Arrivals:
    """Poisson arrivals (odd seeds: on the step-time grid, so arrivals tie with step ends), mixed
    lengths, shared-prefix groups and multi-turn sessions."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(0.02, n))
    if seed % 2:
        t = np.round(t / STEP_S) * STEP_S
    t[5:8] = t[5]  # simultaneous arrivals
    inp, out = rng.integers(8, 200, n), rng.integers(1, 40, n)
    group = np.where(rng.random(n) < 0.4, rng.integers(0, 3, n), -1)
    plen = np.where(group >= 0, np.minimum(inp, 48), 0)
    session = np.where((group < 0) & (rng.random(n) < 0.3), rng.integers(0, 4, n), -1)
    return Arrivals(t, inp, out, group, plen, session)


@pytest.mark.parametrize("limits", [
    EngineLimits(block_size=16, num_blocks=4096, max_num_batched_tokens=2048, max_num_seqs=128),
    EngineLimits(block_size=16, num_blocks=40, max_num_batched_tokens=64, max_num_seqs=8),  # chunks, preemptions
    EngineLimits(block_size=8, num_blocks=60, max_num_batched_tokens=100, max_num_seqs=4,
                 enable_prefix_caching=False),
], ids=["roomy", "tight", "no-cache"])
@pytest.mark.parametrize("seed", [0, 1])
def test_same_token_timelines(limits, seed):
    arr = workload(seed)
    ref = reference_timelines(arr, limits)
    sim = sim_timelines(arr, limits)
    assert set(ref) == set(sim)
    for rid in ref:
        assert sim[rid] == pytest.approx(ref[rid], abs=1e-9), rid
        assert len(ref[rid]) in (0, int(arr.output_len[int(rid)]))
    assert sum(map(bool, ref.values())) >= 0.8 * len(ref)


def test_tight_cache_really_preempts_and_chunks():
    arr = workload(0)
    sim = FleetSim(fixed_profile(STEP_S, EngineLimits(num_blocks=40, max_num_batched_tokens=64, max_num_seqs=8)),
                   FleetConfig(), arr)
    res = sim.run()
    assert res.scheduler["preemptions"] > 0 and res.scheduler["prefix_hits"] > 0
