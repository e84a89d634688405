"""Tiny random Mixtral, Qwen2-MoE (shared expert, gate, dense layer) and Qwen3-MoE (QK norm,
normalised top-k) built with transformers, saved as HF directories, loaded by fleetlm: fp32
greedy tokens identical to transformers, last-position logits close."""

from __future__ import annotations

import pytest
import torch

from fleetlm import LLM, SamplingParams
from tests.helpers import hf_greedy
from tests.moe_helpers import make_tiny_moe_dir

PROMPTS = [[5, 17, 300, 42], list(range(100, 137)), [7] * 3, [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12]]


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe"])
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_moe_dir(tmp_path_factory.mktemp(request.param), request.param)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_greedy_tokens_and_logits_match_transformers(tiny):
    path, hf = tiny
    llm = LLM(str(path), dtype="float32", kv_cache_memory=16 << 20)
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    for p, o in zip(PROMPTS, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 10, None), f"prompt {p[:5]}..."
    model = llm.engine.core.executor.worker.runner.model
    ids = torch.tensor(PROMPTS[1])
    with torch.no_grad():
        ours = model.compute_logits(model(ids[None])[0])
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    sched = llm.engine.core.scheduler
    assert sched.kv.num_free_blocks == sched.cache_config.num_blocks


def test_config_parsed_once_for_engine_and_planner(tiny):
    import json

    from fleetlm.models.loader import config_from_hf
    from fleetlm.plan.model_load import spec_from_config
    from fleetlm.plan.model_spec import count_params

    path, hf = tiny
    raw = json.loads((path / "config.json").read_text())
    moe, spec = config_from_hf(raw).moe, spec_from_config(raw)
    assert (spec.num_experts, spec.num_experts_per_tok, spec.moe_intermediate_size) == (
        moe.num_experts, moe.top_k, moe.moe_intermediate_size)
    assert spec.shared_expert_intermediate_size == moe.shared_expert_intermediate_size
    qk_norms = ("q_norm", "k_norm")  # Qwen3's per-head norms: the planner leaves them out (2 x head_dim a layer)
    hf_total = sum(p.numel() for n, p in hf.named_parameters() if not any(q in n for q in qk_norms))
    assert count_params(spec).total == hf_total
