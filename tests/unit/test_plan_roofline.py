"""Roofline arithmetic: FLOPs, bytes and times of decode and prefill, by hand."""

from __future__ import annotations

import pytest

from fleetlm.plan.formats import weight_format
from fleetlm.plan.hardware import HARDWARE, get_hardware
from fleetlm.plan.model_catalog import catalog_model
from fleetlm.plan.model_spec import count_params
from fleetlm.plan.roofline import Machine, critical_batch, experts_touched, step_cost
from fleetlm.plan.workload import Layout

CPU = get_hardware("cpu", memory=8 << 30, mem_bandwidth=40e9, peak_flops=4e11)


def smol(layout: Layout | None = None) -> Machine:
    return Machine(catalog_model("smollm2-135m"), weight_format("bf16"), "bf16", CPU,
                   layout or Layout())


def test_ridge_points():
    # H100 SXM: 989.4e12 FLOP/s dense bf16 / 3.35e12 B/s = 295 FLOP/byte.
    assert HARDWARE["h100-sxm"].ridge_intensity == pytest.approx(295.3, abs=0.1)
    assert HARDWARE["a100-80g"].ridge_intensity == pytest.approx(312e12 / 2.039e12)
    assert CPU.ridge_intensity == 10.0


def test_smollm2_decode_b1_by_hand():
    s = step_cost(smol(), "decode", 1, 1, 1000)
    h, layers, v = 576, 30, 49152
    block_matrices = layers * (576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536)
    attention = 4 * 9 * 64 * 1000 * layers  # QK^T and PV: 2 FLOPs x 9 heads x 64 x 1000 keys, x2
    flops = 2 * block_matrices + 2 * v * h + attention
    assert s.flops == pytest.approx(flops)
    weights = 2 * (block_matrices + layers * 2 * h + h) + 2 * v * h  # tied: LM head = embedding
    kv = 1000 * 23_040
    act = layers * (4 * h + 2 * (9 + 3) * 64 + 6 * 1536) * 2
    assert s.bytes == pytest.approx(weights + 2 * h + kv + act)
    assert s.time_s == pytest.approx(max(flops / 4e11, s.bytes / 40e9))
    assert s.bound == "memory" and s.t_comm_s == 0


def test_prefill_is_causal_and_compute_bound():
    n = 512
    s = step_cost(smol(), "prefill", 1, n, n)
    c = count_params(catalog_model("smollm2-135m"))
    matrices = c.attention + c.dense_mlp
    attention = 4 * 9 * 64 * (n * (n + 1) / 2) * 30
    assert s.flops == pytest.approx(2 * n * matrices + 2 * 49152 * 576 + attention)
    assert s.bound == "compute"
    assert s.intensity > CPU.ridge_intensity


def test_batching_raises_intensity_until_kv_dominates():
    mc = smol()
    i1 = step_cost(mc, "decode", 1, 1, 256).intensity
    i64 = step_cost(mc, "decode", 64, 1, 256).intensity
    assert i64 > 20 * i1
    # At short context decode turns compute-bound; at long context KV reads keep it memory-bound
    # (GQA 9/3: attention does 3 FLOP per KV byte, below the ridge of 10).
    assert critical_batch(mc, 64) is not None
    assert critical_batch(mc, 8192) is None


def test_tp_all_reduce_cost():
    h100 = get_hardware("h100-sxm")
    m = catalog_model("llama-3.1-70b")
    mc = Machine(m, weight_format("bf16"), "bf16", h100, Layout(tp=8))
    s = step_cost(mc, "decode", 64, 1, 2048)
    msg = 64 * 8192 * 2  # 64 tokens x hidden x bf16
    per = 2 * 7 / 8 * msg / 450e9 + 10e-6  # ring all-reduce over NVLink + latency
    assert s.t_comm_s == pytest.approx(2 * 80 * per)
    single = step_cost(Machine(m, weight_format("bf16"), "bf16", h100, Layout()), "decode", 64, 1, 2048)
    assert s.t_memory_s == pytest.approx(single.t_memory_s / 8, rel=0.01)


def test_moe_experts_touched():
    assert experts_touched(8, 2, 1) == pytest.approx(2)
    assert experts_touched(256, 8, 1) == pytest.approx(8)
    assert experts_touched(8, 2, 1000) == pytest.approx(8)
    m = catalog_model("mixtral-8x7b")
    mc = Machine(m, weight_format("bf16"), "bf16", get_hardware("h100-sxm"), Layout())
    b1, b64 = step_cost(mc, "decode", 1, 1, 10), step_cost(mc, "decode", 64, 1, 10)
    c = count_params(m)
    assert b1.bytes == pytest.approx(2 * c.active, rel=0.01)  # 2 of 8 experts read
    assert b64.bytes == pytest.approx(2 * c.total, rel=0.02)  # every expert read


def test_fp8_uses_fp8_peak_and_a100_falls_back():
    m = catalog_model("llama-3.1-8b")
    h100 = Machine(m, weight_format("fp8"), "fp8", get_hardware("h100-sxm"), Layout())
    a100 = Machine(m, weight_format("fp8"), "fp8", get_hardware("a100-80g"), Layout())
    assert h100.peak == 1978.9e12
    assert a100.peak == 312e12
