"""Parallelism decisions follow the documented rules and explain themselves."""

from __future__ import annotations

import pytest

from fleetlm.plan import PlanError
from fleetlm.plan.formats import weight_format
from fleetlm.plan.hardware import get_hardware
from fleetlm.plan.model_catalog import catalog_model
from fleetlm.plan.parallel import Forced, plan_parallel
from fleetlm.plan.train_report import plan_training
from fleetlm.plan.workload import Workload

H100 = get_hardware("h100-sxm")
BF16 = weight_format("bf16")


def plan(name, gpus, dtype="bf16", forced=None, **workload):
    return plan_parallel(catalog_model(name), weight_format(dtype), H100, Workload(**workload),
                         gpus, forced)


def test_70b_on_one_node_uses_tp8():
    p = plan("llama-3.1-70b", 8, context=8192, concurrency=64)
    assert (p.layout.tp, p.layout.pp, p.layout.dp) == (8, 1, 1)
    assert p.memory.max_concurrent_seqs >= 64
    assert p.reasons[0].startswith("TP=8:")


def test_small_model_replicates_with_dp():
    p = plan("llama-3.1-8b", 8, context=2048, concurrency=512)
    assert p.layout.tp < 8 and p.layout.dp == 8 // p.layout.tp
    assert any(r.startswith("DP=") for r in p.reasons)


def test_405b_bf16_needs_pp_across_two_nodes():
    p = plan("llama-3.1-405b", 16, context=8192, concurrency=16)
    assert (p.layout.tp, p.layout.pp) == (8, 2)  # TP stops at the node, PP only to fit
    assert any(r.startswith("PP=2:") for r in p.reasons)
    fp8 = plan("llama-3.1-405b", 8, dtype="fp8", context=8192, concurrency=16)
    assert (fp8.layout.tp, fp8.layout.pp) == (8, 1)


def test_moe_uses_ep_and_mla_uses_dp_attention():
    mix = plan("mixtral-8x7b", 8, context=4096, concurrency=64)
    assert mix.layout.ep == mix.layout.tp
    assert any(r.startswith("EP=") for r in mix.reasons)
    ds = plan("deepseek-v3", 16, dtype="fp8", context=8192, concurrency=64)
    assert ds.layout.tp == 1 and ds.layout.ep == 16 and ds.memory.fits


def test_context_parallel_for_very_long_prompts():
    p = plan("llama-3.1-70b", 64, context=131072, concurrency=4, output_len=128, max_batched_tokens=2048,
             forced=Forced(tp=2))
    assert p.layout.cp > 1
    assert any(r.startswith("CP=") for r in p.reasons)


def test_disaggregation_at_high_concurrency_with_long_prompts():
    p = plan("llama-3.1-8b", 8, context=8192, concurrency=256, output_len=128)
    assert p.disaggregate and p.prefill_replicas + p.decode_replicas == p.layout.dp
    short = plan("llama-3.1-8b", 8, context=512, concurrency=4, output_len=256)
    assert not short.disaggregate


def test_forced_dp_is_honoured():
    p = plan("llama-3.1-70b", 8, forced=Forced(dp=2), context=8192, concurrency=8)
    assert (p.layout.tp, p.layout.pp, p.layout.dp) == (4, 1, 2)
    p = plan("llama-3.1-70b", 16, forced=Forced(dp=1), context=8192)
    assert (p.layout.tp, p.layout.pp, p.layout.dp) == (8, 2, 1)


def test_does_not_fit_is_reported():
    p = plan("llama-3.1-405b", 1, context=4096)
    assert not p.memory.fits


@pytest.mark.parametrize("forced,match", [
    (Forced(tp=3), "does not divide the 64 attention heads"),
    (Forced(tp=8, dp=2), "contradictory flags"),
    (Forced(ep=2), "not a mixture-of-experts"),
    (Forced(pp=81), "exceeds the 80 layers"),
    (Forced(tp=16), "not a multiple"),
])
def test_bad_forced_degrees(forced, match):
    with pytest.raises(PlanError, match=match):
        plan("llama-3.1-70b", 8, forced=forced)


def test_training_plan_choices():
    r = plan_training(catalog_model("llama-3.1-70b"), H100, gpus=256, tokens=2e12, mfu=0.4)
    assert r.fits and r.strategy in ("zero3", "fsdp2") and r.dp == 256 // (r.tp * r.pp)
    small = plan_training(catalog_model("smollm2-135m"), H100, gpus=8)
    assert small.strategy == "ddp" and not small.checkpointing
    huge = plan_training(catalog_model("llama-3.1-405b"), H100, gpus=16)
    assert not huge.fits  # 405B x 16 B/param of states is 6.5 TB > 16 x 80 GB
    with pytest.raises(PlanError, match="accepted values"):
        plan_training(catalog_model("smollm2-135m"), H100, gpus=8, strategy="zero4")
