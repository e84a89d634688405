"""Profiles: step shapes, the fitted table model, the roofline model, JSON and model checks."""

import json

import numpy as np
import pytest

from fleetlm.plan.errors import PlanError
from fleetlm.sim.profile import EngineLimits, Profile, ProfileError, load_profile
from fleetlm.sim.profile_fit import fit_table_model, nnls
from fleetlm.sim.roofline_profile import replica_capacity, roofline_profile
from fleetlm.sim.step_model import StepShape, TableStepModel, chunk_pairs, shape_of


class R:
    def __init__(self, prompt, computed, total=None):
        self.num_prompt_tokens, self.num_computed_tokens = prompt, computed
        self.num_tokens = total if total is not None else prompt


def test_shape_of_a_mixed_step():
    reqs = {"d": R(10, 13, 13), "p": R(100, 64), "c": R(100, 100), "x": R(50, 51, 51)}
    # d: decode at KV length 13; p: first chunk [0, 64); c: last chunk [64, 100); x: transferred prompt
    shape, samples = shape_of({"d": 1, "p": 64, "c": 36, "x": 51}, reqs, {"x"})
    assert samples == [True, False, True, True]
    assert shape == StepShape(tokens=1 + 64 + 36, sampled=3, decode_ctx=13 + 51,
                              pairs=chunk_pairs(0, 64) + chunk_pairs(64, 100), kv_tokens=13 + 128 + 136 + 51, seqs=4,
                              ctx_pairs=chunk_pairs(64, 100), ctx_rect=36 * 100, ctx_kv=100, prefill_segments=2)
    uniform, _ = shape_of({"a": 8, "b": 8}, {"a": R(8, 8), "b": R(8, 8)})
    assert uniform.prefill_segments == 0  # equal lengths, no context: one batched call
    assert chunk_pairs(0, 4) == 10 and chunk_pairs(2, 4) == 7


def test_fit_recovers_a_known_model_despite_outliers():
    true = TableStepModel((1.0, 64.0, 512.0, 2048.0), (0.02, 0.03, 0.2, 0.9), 1e-4, 2e-6, 3e-8,
                          per_ctx_rect_s=2e-7, per_ctx_kv_s=5e-6)
    rng = np.random.default_rng(0)
    shapes = []
    for _ in range(300):
        b, kind = int(rng.integers(1, 128)), rng.random()
        if kind < 0.4:
            ctx = int(rng.integers(16, 2048))
            shapes.append(StepShape(b, b, b * ctx, 0, b * ctx, b))
        elif kind < 0.7:
            n = int(rng.integers(16, 2048))
            shapes.append(StepShape(n, 1, 0, chunk_pairs(0, n), 2 * n, 1))
        else:  # prefix hits: n own tokens after a cached prefix of c
            n, c = int(rng.integers(16, 512)), int(rng.integers(16, 1024))
            p = chunk_pairs(c, c + n)
            shapes.append(StepShape(n, 1, 0, p, c + 2 * n, 1, p, n * (c + n), c + n))
    times = [true.time(s) * (1 + 0.01 * rng.standard_normal()) for s in shapes]
    for i in range(0, 300, 30):  # another process slowed a few steps
        times[i] *= 2.0
    model, fit = fit_table_model(shapes, times, knots=true.knots)
    assert fit["median_rel_err"] < 0.02 and fit["outliers_dropped"] >= 10
    for s in shapes[1:40]:
        assert model.time(s) == pytest.approx(true.time(s), rel=0.05)


def test_fit_follows_the_mean_under_skewed_noise():
    """A shared machine slows steps a little, often (right-skewed noise): the profile must
    predict the mean step time, which latencies add up, not the fastest steps."""
    true = TableStepModel((1.0, 64.0, 512.0), (0.04, 0.06, 0.15), 3e-4, 3e-6, 1.5e-7)
    rng = np.random.default_rng(1)
    shapes = []
    for _ in range(400):
        b, ctx, n = int(rng.integers(1, 64)), int(rng.integers(64, 1024)), int(rng.integers(16, 512))
        shapes.append(StepShape(b, b, b * ctx, 0, b * ctx, b) if rng.random() < 0.6
                      else StepShape(n, 1, 0, chunk_pairs(0, n), 2 * n, 1, prefill_segments=1))
    slow = 1 + rng.exponential(0.15, len(shapes))  # mean 1.15, median about 1.10
    times = [true.time(s) * f for s, f in zip(shapes, slow)]
    model, fit = fit_table_model(shapes, times, knots=true.knots)
    pred, t = np.array([model.time(s) for s in shapes]), np.array(times)
    assert np.mean(t / pred) == pytest.approx(1.0, abs=0.02)
    for s in shapes[:40]:
        assert model.time(s) == pytest.approx(1.15 * true.time(s), rel=0.06)


def test_nnls_matches_the_constrained_optimum():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert nnls(a, np.array([1.0, -1.0, 0.0])) == pytest.approx([0.5, 0.0])
    assert nnls(a, np.array([1.0, 2.0, 3.0])) == pytest.approx([1.0, 2.0])


@pytest.mark.parametrize("model, tp", [("llama-3.1-8b", 1), ("llama-3.1-70b", 4), ("mixtral-8x7b", 2)])
def test_roofline_profile_costs_what_the_planner_says(model, tp):
    from fleetlm.plan.hardware import get_hardware
    from fleetlm.plan.model_load import load_model_spec
    from fleetlm.plan.roofline import Machine, step_cost
    from fleetlm.plan.workload import Layout

    prof = roofline_profile(model, "h100-sxm", tp=tp, mfu=1.0, mbu=1.0, overhead_s=0.0)
    mc = Machine(load_model_spec(model), _fmt(), "bf16", get_hardware("h100-sxm"),
                 Layout(tp=tp, ep=tp if "mixtral" in model else 1))
    for b, ctx in ((1, 300), (16, 1000), (64, 3000), (256, 700)):
        want = step_cost(mc, "d", b, 1, ctx).time_s
        assert prof.step_time(StepShape(b, b, b * ctx, 0, b * ctx, b)) == pytest.approx(want, rel=0.02)
    for n in (100, 1000, 4000):
        want = step_cost(mc, "p", 1, n, n).time_s
        assert prof.step_time(StepShape(n, 1, 0, chunk_pairs(0, n), 2 * n, 1)) == pytest.approx(want, rel=0.02)
    assert prof.engine.num_blocks > 1000 and prof.tp == tp and prof.kv_bytes_per_token > 0
    assert any("mfu" in a for a in prof.assumptions)


def _fmt():
    from fleetlm.plan.formats import weight_format

    return weight_format("bf16")


def test_roofline_profile_that_does_not_fit():
    with pytest.raises(PlanError, match="does not fit"):
        roofline_profile("llama-3.1-70b", "h100-sxm", tp=1)
    with pytest.raises(PlanError, match="does not divide"):
        roofline_profile("llama-3.1-8b", "h100-sxm", tp=3)


def test_capacity_bound_grows_with_tp():
    a = replica_capacity(roofline_profile("llama-3.1-70b", "h100-sxm", tp=2), 512, 256)
    b = replica_capacity(roofline_profile("llama-3.1-70b", "h100-sxm", tp=8), 512, 256)
    assert 0 < a < b


def test_json_round_trip_and_model_check(tmp_path):
    prof = roofline_profile("llama-3.1-8b", "h200", tp=2)
    p = prof.save(tmp_path / "p.json")
    back = load_profile(p)
    s = StepShape(40, 40, 40 * 900, 0, 40 * 900, 40)
    assert back.step_time(s) == prof.step_time(s) and back.engine == prof.engine
    back.check_model("llama-3.1-8b")
    with pytest.raises(ProfileError, match="is for model 'llama-3.1-8b', not 'llama-3.1-70b'"):
        back.check_model("llama-3.1-70b")


@pytest.mark.parametrize("doc, words", [
    ("not json", "not valid JSON"),
    (json.dumps({"format": "other"}), "format"),
    (json.dumps({"format": "fleetlm-profile/1", "model": "m"}), "missing field"),
    (json.dumps({"format": "fleetlm-profile/1", "model": "m", "hardware": "h", "source": "s",
                 "step": {"kind": "magic"}}), "kind"),
    (json.dumps({"format": "fleetlm-profile/1", "model": "m", "hardware": "h", "source": "s",
                 "step": {"kind": "table", "knots": [1], "base_s": [0.1]}, "engine": {"num_blocks": 0}}),
     "engine.num_blocks"),
])
def test_bad_profiles(tmp_path, doc, words):
    p = tmp_path / "bad.json"
    p.write_text(doc)
    with pytest.raises(ProfileError, match=words):
        load_profile(p)


def test_engine_limits_feed_the_scheduler():
    prof = Profile("m", "h", "fixed", TableStepModel((1.0,), (0.01,)), EngineLimits(max_num_seqs=3))
    sched, cache = prof.with_engine(num_blocks=77).engine.configs()
    assert sched.max_num_seqs == 3 and cache.num_blocks == 77


def test_calibrate_serving_recovers_per_token_work_and_frontend_latency():
    from dataclasses import replace

    from fleetlm.sim import FleetConfig, WorkloadSpec, generate, simulate
    from fleetlm.sim.calibrate import calibrate_serving

    base = Profile("m", "cpu", "measured", TableStepModel((1.0, 64.0, 2048.0), (0.02, 0.03, 0.5), 1e-4, 1e-6, 1e-8))
    served = replace(base, serve_per_token_s=4e-4, frontend_s=0.012)
    arr = generate(WorkloadSpec(rate=8.0, num_requests=40, input_len=128, output_len=32, seed=2))
    measured = simulate(served, FleetConfig(), arr).metrics
    tuned = calibrate_serving(base, arr, measured)
    assert tuned.serve_per_token_s == pytest.approx(4e-4, rel=0.05)
    assert tuned.frontend_s == pytest.approx(0.012, abs=1e-3)
    s = StepShape(10, 10, 1000, 0, 1000, 10)
    assert tuned.step_time(s) == pytest.approx(base.step_time(s) + 10 * tuned.serve_per_token_s)
