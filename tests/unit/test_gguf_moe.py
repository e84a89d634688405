"""MoE models from GGUF files (llama.cpp's layout: stacked expert tensors, ``{arch}.expert_*``
metadata): fp32 greedy tokens equal to the same weights loaded from the Hugging Face directory
(which tests/unit/test_moe_models.py holds equal to transformers), for Mixtral, Qwen2-MoE (shared
expert and gate, a dense layer) and Qwen3-MoE (q/k norms); a file whose expert tensors disagree
with its metadata is refused naming both."""

from __future__ import annotations

import dataclasses

import pytest

from fleetlm import LLM, SamplingParams
from tests.moe_helpers import make_tiny_moe_dir, write_moe_gguf

PROMPTS = [[7, 300, 4000, 12, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [4242] * 6]


def _greedy(model: str) -> tuple[list[list[int]], object]:
    with LLM(model, dtype="float32", kv_cache_memory=8 << 20) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
        cfg = llm.engine.core.executor.worker.runner.model.config
        return [o.outputs[0].token_ids for o in outs], cfg


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_gguf_moe_greedy_equals_the_hf_directory(tmp_path, family):
    hf = make_tiny_moe_dir(tmp_path / "hf", family)
    path = write_moe_gguf(hf, tmp_path / "m.gguf", family)
    want, hf_cfg = _greedy(str(hf))
    got, cfg = _greedy(str(path))
    assert cfg.architecture == hf_cfg.architecture
    # a GGUF carries no training settings: the router's auxiliary loss weight stays 0
    assert cfg.moe == dataclasses.replace(hf_cfg.moe, router_aux_loss_coef=0.0)
    assert cfg.intermediate_size == hf_cfg.intermediate_size
    assert got == want


def test_expert_tensors_that_disagree_with_the_metadata_are_refused(tmp_path):
    hf = make_tiny_moe_dir(tmp_path / "hf", "mixtral")
    path = write_moe_gguf(hf, tmp_path / "bad.gguf", "mixtral", expert_count=4)  # the file holds 8
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate_inp\.weight has shape \[8, 64\].*expert_count = 4"):
        LLM(str(path), dtype="float32", kv_cache_memory=8 << 20)


def test_planner_reads_an_moe_gguf_with_the_engines_parser(tmp_path):
    """The planner's parameter count of the GGUF equals its count of the HF config (which
    tests/unit/test_moe_models.py holds equal to transformers')."""
    from fleetlm.plan.model_load import load_model_spec
    from fleetlm.plan.model_spec import count_params

    hf = make_tiny_moe_dir(tmp_path / "hf", "qwen2_moe")
    a = load_model_spec(str(hf))
    b = load_model_spec(str(write_moe_gguf(hf, tmp_path / "m.gguf", "qwen2_moe")))
    assert (b.num_experts, b.moe_intermediate_size, b.shared_expert_intermediate_size, b.num_dense_layers) == \
        (a.num_experts, a.moe_intermediate_size, a.shared_expert_intermediate_size, a.num_dense_layers)
    assert count_params(b).total == count_params(a).total and count_params(b).active == count_params(a).active
