"""Arrivals (synthetic and traces), prompts with prefix structure, and sub-fleet sampling."""

import math

import numpy as np
import pytest

from fleetlm.bench.serve_datasets import arrival_offsets, random_requests, shared_prefix_requests
from fleetlm.sim import (
    FleetConfig,
    WorkloadError,
    WorkloadSpec,
    fixed_profile,
    generate,
    load_trace,
    simulate,
)
from fleetlm.sim.sampling import sub_fleet, thin
from fleetlm.sim.workload import PromptFactory


def test_same_requests_as_bench_serve():
    spec = WorkloadSpec("random", rate=4.0, num_requests=50, seed=3, input_len=256, output_len=128, range_ratio=0.5)
    arr = generate(spec)
    bench = random_requests(50, 256, 128, 0.5, seed=3)
    assert arr.input_len.tolist() == [r.prompt_len for r in bench]
    assert arr.output_len.tolist() == [r.output_len for r in bench]
    assert arr.t.tolist() == arrival_offsets(50, 4.0, 1.0, 3).tolist()
    sp = generate(WorkloadSpec("shared-prefix", num_requests=10, prefix_len=40, suffix_len=8, num_prefixes=3,
                               output_len=5))
    bench_sp = shared_prefix_requests(10, 40, 8, 3, 5)
    assert sp.input_len.tolist() == [r.prompt_len for r in bench_sp]
    assert sp.group.tolist() == [i % 3 for i in range(10)]


@pytest.mark.parametrize("burstiness", [1.0, 0.25])
def test_duration_rate_and_burstiness(burstiness):
    arr = generate(WorkloadSpec(rate=200.0, duration=50.0, burstiness=burstiness, seed=1))
    assert arr.t.max() < 50.0 and len(arr) == pytest.approx(10_000, rel=0.1)
    gaps = np.diff(arr.t)
    cv2 = gaps.var() / gaps.mean() ** 2  # squared coefficient of variation = 1 / shape
    assert cv2 == pytest.approx(1 / burstiness, rel=0.15)


def test_prompts_share_exactly_what_the_workload_says():
    pf = PromptFactory(output_token=1)
    a, b = pf.prompt(0, 20, 3), pf.prompt(1, 20, 3)
    assert a[0] != b[0] and len(a) == 20
    g1, g2 = pf.prompt(2, 50, 3, group=7, prefix_len=32), pf.prompt(3, 50, 3, group=7, prefix_len=32)
    assert g1[:32] == g2[:32] and g1[32] != g2[32]
    t1 = pf.prompt(4, 10, 5, session=1)
    t2 = pf.prompt(5, 6, 2, session=1)
    assert t2[:15] == t1 + [1] * 5 and len(t2) == 21


def write(tmp_path, text, name="t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_trace_csv_and_jsonl(tmp_path):
    arr = load_trace(write(tmp_path, "timestamp,input_len,output_len,prefix_group,prefix_len,session_id\n"
                                     "0,100,10,sys,64,\n0.5,50,5,,,alice\n0.5,40,5,sys,32,alice\n"))
    assert arr.t.tolist() == [0.0, 0.5, 0.5] and arr.group.tolist() == [0, -1, 0]
    assert arr.session.tolist() == [-1, 0, 0] and arr.prefix_len.tolist() == [64, 0, 32]
    j = load_trace(write(tmp_path, '{"timestamp": 1.5, "input_len": 8, "output_len": 2}\n', "t.jsonl"))
    assert j.t.tolist() == [1.5] and j.input_len.tolist() == [8]


@pytest.mark.parametrize("body, words", [
    ("timestamp,input_len,output_len\n1,10,2\n0.5,10,2\n", ["line 3", "before the previous", "non-decreasing"]),
    ("timestamp,input_len,output_len\n-1,10,2\n", ["line 2", "negative"]),
    ("timestamp,input_len,output_len\nnan,10,2\n", ["line 2", "not finite"]),
    ("timestamp,input_len,output_len\n0,abc,2\n", ["input_len", "not an integer"]),
    ("timestamp,input_len,output_len\n0,0,2\n", ["input_len and output_len must be >= 1"]),
    ("timestamp,input_len\n0,10\n", ["output_len"]),
    ("timestamp,input_len,output_len,prefix_len\n0,10,2,5\n", ["prefix_group"]),
    ("timestamp,input_len,output_len\n", ["holds no requests"]),
])
def test_bad_traces_name_what_is_wrong(tmp_path, body, words):
    with pytest.raises(WorkloadError) as e:
        load_trace(write(tmp_path, body))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_specs_are_rejected():
    with pytest.raises(WorkloadError, match="exactly one"):
        WorkloadSpec(num_requests=5, duration=3.0, rate=1.0)
    with pytest.raises(WorkloadError, match="finite request rate"):
        WorkloadSpec(duration=3.0)
    with pytest.raises(WorkloadError, match="range ratio"):
        WorkloadSpec(num_requests=1, range_ratio=1.5)


def test_sub_fleet_shapes():
    assert sub_fleet(100, 0, 4) == sub_fleet(100, 0, 4)
    sf = sub_fleet(100, 0, 4)
    assert (sf.decode, sf.decode_total, sf.fraction) == (4, 100, 0.04)
    pd = sub_fleet(90, 30, 6)  # 1:2 split -> 2 prefill + 4 decode of 30 + 60
    assert (pd.prefill, pd.decode) == (2, 4) and pd.prefill / 30 == pd.decode / 60
    with pytest.raises(ValueError, match="P/D"):
        sub_fleet(3, 3, None)


def test_round_robin_sampling_is_exact_for_the_sampled_replicas():
    """K of N replicas under round robin see exactly what replicas 0..K-1 of the full fleet see."""
    arr = generate(WorkloadSpec(rate=60.0, num_requests=400, input_len=64, output_len=16, range_ratio=0.5))
    prof = fixed_profile(0.01)
    full = simulate(prof, FleetConfig(replicas=8, router="round_robin"), arr)
    part = simulate(prof, FleetConfig(replicas=8, router="round_robin", sample_replicas=2), arr)
    kept = [i for i in range(len(arr)) if i % 8 < 2]
    assert [round(r.ttft, 9) for r in part.results] == [round(full.results[i].ttft, 9) for i in kept]
    assert [round(r.latency, 9) for r in part.results] == [round(full.results[i].latency, 9) for i in kept]


def test_random_thinning_keeps_the_share_and_sessions_whole():
    rng = np.random.default_rng(0)
    n = 20_000
    arr = generate(WorkloadSpec(rate=100.0, num_requests=n))
    from fleetlm.sim import Arrivals

    sess = Arrivals(arr.t, arr.input_len, arr.output_len, arr.group, arr.prefix_len, rng.integers(0, 2000, n))
    kept = thin(sess, sub_fleet(50, 0, 5), "prefix")
    assert len(kept) == pytest.approx(n / 10, rel=0.2)
    kept_sessions = set(kept.session.tolist())
    assert sum(1 for s in sess.session.tolist() if s in kept_sessions) == len(kept)  # whole sessions
    ll = thin(arr, sub_fleet(50, 0, 5), "least_load")
    assert len(ll) == pytest.approx(n / 10, rel=0.1) and math.isclose(ll.t[0], arr.t[np.searchsorted(arr.t, ll.t[0])])
