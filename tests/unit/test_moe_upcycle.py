"""Sparse upcycling: a dense model copied into E identical experts plus a new router computes
what the dense model did (greedy tokens identical, logits within 1e-5), in fleetlm and in
transformers (the written directory is a standard Mixtral / Qwen2-MoE)."""

from __future__ import annotations

import pytest
import torch

from fleetlm import LLM, SamplingParams
from fleetlm.moe.upcycle import upcycle
from tests.helpers import make_tiny_hf_dir

PROMPTS = [[5, 17, 300, 42], list(range(100, 137)), [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12]]
SP = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _run(path, **kw):
    llm = LLM(str(path), dtype="float32", kv_cache_memory=16 << 20, **kw)
    toks = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SP,
                                                         use_tqdm=False)]
    model = llm.engine.core.executor.worker.runner.model
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor([PROMPTS[1]]))[0])
    return toks, logits, model


@pytest.mark.parametrize("arch,experts,top_k", [("llama", 8, 2), ("qwen2", 4, 3)])
def test_upcycled_model_computes_what_the_dense_one_did(tmp_path, arch, experts, top_k):
    dense = make_tiny_hf_dir(tmp_path / "dense", arch=arch, initializer_range=0.2)
    moe = upcycle(dense, tmp_path / "moe", num_experts=experts, top_k=top_k)
    ref_toks, ref_logits, _ = _run(dense)
    toks, logits, model = _run(moe)
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    layers = model.moe_layers()
    assert len(layers) == 3 and all(m.num_experts == experts and m.top_k == top_k for m in layers.values())
    # routed: every layer saw every token top_k times
    assert all(sum(m.stats.snapshot().tokens) > 0 for m in layers.values())
    if arch == "llama":  # capacity with reroute, nothing dropped: still the dense output
        cap_toks, _, cap_model = _run(moe, moe_capacity_factor=1.0, moe_overflow_policy="reroute")
        stats = [m.stats.snapshot() for m in cap_model.moe_layers().values()]
        assert sum(s.rerouted for s in stats) > 0 and sum(s.dropped for s in stats) == 0
        assert cap_toks == ref_toks


def test_transformers_loads_the_upcycled_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = make_tiny_hf_dir(tmp_path / "dense", initializer_range=0.2)
    moe = upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_upcycling_refuses_bad_input(tmp_path):
    dense = make_tiny_hf_dir(tmp_path / "dense")
    with pytest.raises(ValueError, match="1 <= top_k <= num_experts"):
        upcycle(dense, tmp_path / "x", num_experts=2, top_k=3)
    moe = upcycle(dense, tmp_path / "moe", num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="already a mixture of experts"):
        upcycle(moe, tmp_path / "y")
