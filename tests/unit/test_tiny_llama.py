"""A tiny random-weight Llama (and Qwen2-style variant) built in the test, saved as a Hugging
Face directory, loaded by fleetlm and compared with transformers layer by layer and token by
token (fp32, greedy)."""

import pytest
import torch

from fleetlm import LLM, SamplingParams
from tests.helpers import hf_greedy, make_tiny_hf_dir

PROMPTS = [[5, 17, 300, 42], list(range(100, 137)), [7] * 3, list(range(2000, 2090, 3)), [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12]]


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama3-rope"])
def tiny(request, tmp_path_factory):
    kw = {"initializer_range": 0.2}
    arch = request.param
    if arch == "llama3-rope":
        arch, kw["rope_scaling"] = "llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        kw["rope_theta"] = 500000.0
    if request.param == "llama":
        kw["tie_word_embeddings"] = True
    path = make_tiny_hf_dir(tmp_path_factory.mktemp(request.param), arch=arch, **kw)
    return path, _hf(path)


def _layer_outputs(layers, run, ours=False):
    """Each decoder layer's output hidden states. Ours return (block output, residual before
    it): their sum is what a Hugging Face layer returns."""
    caught = []

    def hook(m, i, o):
        caught.append(o[0] + o[1] if ours else (o[0] if isinstance(o, tuple) else o))

    hooks = [layer.register_forward_hook(hook) for layer in layers]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return caught


def test_layer_by_layer_matches_transformers(tiny):
    path, hf = tiny
    llm = LLM(str(path), dtype="float32", kv_cache_memory=16 << 20)
    ours_model = llm.engine.core.executor.worker.runner.model
    prompt = PROMPTS[1]
    ours = _layer_outputs(ours_model.layers, lambda: llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False), ours=True)
    with torch.no_grad():
        ref = _layer_outputs(hf.model.layers, lambda: hf(torch.tensor([prompt])))
    assert len(ours) == len(ref) == hf.config.num_hidden_layers
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b[0], rtol=1e-4, atol=1e-4, msg=f"layer {i} differs")
    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt])).logits[0, -1]
        ours_logits = ours_model.compute_logits(ours_model.model.norm(ours[-1][-1:]))[0]
    torch.testing.assert_close(ours_logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine_kw", [
    {}, {"enable_prefix_caching": False}, {"max_num_batched_tokens": 8}, {"num_kv_blocks": 16, "block_size": 4},
    {"attention_backend": "torch_paged"}, {"attention_backend": "torch_paged", "max_num_batched_tokens": 8},
], ids=["default", "no-prefix-cache", "chunked-8", "preempting", "torch-paged", "torch-paged-chunked-8"])
def test_batched_greedy_matches_transformers(tiny, engine_kw):
    path, hf = tiny
    sizing = {} if "num_kv_blocks" in engine_kw else {"kv_cache_memory": 16 << 20}
    llm = LLM(str(path), dtype="float32", **sizing, **engine_kw)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = PROMPTS + [PROMPTS[1][:20] + [1, 2, 3]]  # shares a prefix with prompt 1
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 12, None), f"prompt {p[:5]}..."
    sched = llm.engine.core.scheduler
    assert sched.kv.num_free_blocks == sched.cache_config.num_blocks
    if "num_kv_blocks" in engine_kw:
        assert sched.num_preemptions > 0
