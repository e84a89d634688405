"""Expert parallelism end to end on gloo: a tiny random Mixtral (and Qwen2-MoE with its shared
expert) served with tensor_parallel_size=2 and enable_expert_parallel (both dispatches) and with
plain TP=2, and with hot-expert replicas rebalanced every 2 steps, generates the same greedy
tokens as one process, and every KV block returns."""

from __future__ import annotations

import pytest

from fleetlm import LLM, SamplingParams
from tests.moe_helpers import make_tiny_moe_dir

PROMPTS = [[5, 17, 300, 42], list(range(100, 137)), [7] * 3, list(range(2000, 2090, 3))]
SP = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
LAYOUTS = {
    "ep2-all_to_all": {"tensor_parallel_size": 2, "enable_expert_parallel": True},
    "ep2-all_reduce": {"tensor_parallel_size": 2, "enable_expert_parallel": True, "moe_ep_dispatch": "all_reduce"},
    "tp2": {"tensor_parallel_size": 2},
    "ep2-replicas": {"tensor_parallel_size": 2, "enable_expert_parallel": True, "moe_replica_slots": 1,
                     "moe_rebalance_interval": 2},
}


def _tokens(path, **kw):
    with LLM(str(path), dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=32, **kw) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP, use_tqdm=False)
        sched = llm.engine.core.scheduler
        assert sched.kv.num_free_blocks == sched.cache_config.num_blocks
        if kw.get("moe_replica_slots"):  # rebalanced mid-load: copies placed, every request finished
            llm.engine.core.executor._moe_report = None
            report = llm.engine.core.stats().moe
            assert all(report.replicas) and all(len(r) == 2 for r in report.rank_tokens)
            assert all(o.finished and len(o.outputs[0].token_ids) == SP.max_tokens for o in outs)
        return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def family(request, tmp_path_factory):
    path = make_tiny_moe_dir(tmp_path_factory.mktemp(request.param), request.param)
    return path, _tokens(path)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_equals_one_process(family, layout):
    path, reference = family
    if path.name.startswith("qwen2_moe") and layout != "ep2-all_to_all":
        pytest.skip("the shared-expert family: the all-to-all layout suffices (its extra all-reduce)")
    assert _tokens(path, **LAYOUTS[layout]) == reference


def test_expert_count_not_divisible_by_ep_size_is_refused(tmp_path):
    path = make_tiny_moe_dir(tmp_path / "m", "mixtral", num_local_experts=3, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="expert parallel size 2 .* does not divide the model's 3 experts"):
        LLM(str(path), dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2,
            enable_expert_parallel=True)


def test_expert_parallel_on_a_dense_model_is_refused(tmp_path):
    from tests.helpers import make_tiny_hf_dir

    path = make_tiny_hf_dir(tmp_path / "d")
    with pytest.raises(ValueError, match="enable_expert_parallel needs a mixture-of-experts model"):
        LLM(str(path), dtype="float32", kv_cache_memory=16 << 20, enable_expert_parallel=True)


def test_upcycled_llama_at_ep2_with_replicas_equals_dense(tmp_path):
    """Sparse upcycling through the expert-parallel paths: 8 identical experts at EP=2, with and
    without hot-expert replicas rebalanced mid-load, generate what the dense model does."""
    from fleetlm.moe.upcycle import upcycle
    from tests.helpers import make_tiny_hf_dir

    dense = make_tiny_hf_dir(tmp_path / "dense", initializer_range=0.2)
    moe = upcycle(dense, tmp_path / "moe", num_experts=8, top_k=2)
    reference = _tokens(dense)
    assert _tokens(moe, **LAYOUTS["ep2-all_to_all"]) == reference
    assert _tokens(moe, **LAYOUTS["ep2-replicas"]) == reference
