"""SmolLM2-135M upcycled to 8 identical experts (top-2, new router): greedy output identical to
dense SmolLM2 and last-position logits within 3e-5 (fp32; see the comment), in one process."""

from __future__ import annotations

import pytest
import torch

from fleetlm import LLM, SamplingParams
from fleetlm.moe.upcycle import upcycle

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
SP = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def _run(model: str, **kw):
    with LLM(model, dtype="float32", kv_cache_memory=64 << 20, **kw) as llm:
        outs = llm.generate(PROMPTS, SP, use_tqdm=False)
        logits = None
        if kw.get("tensor_parallel_size", 1) == 1:
            m = llm.engine.core.executor.worker.runner.model
            ids = torch.tensor([llm.get_tokenizer().encode(PROMPTS[0])])
            with torch.no_grad():
                logits = m.compute_logits(m(ids)[0])[-1]
        return [o.outputs[0].token_ids for o in outs], logits


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    return upcycle("smollm2-135m-instruct", tmp_path_factory.mktemp("smollm2_moe"), num_experts=8, top_k=2)


def test_upcycled_smollm2_matches_dense(upcycled):
    dense_tokens, dense_logits = _run("smollm2-135m-instruct")
    tokens, logits = _run(str(upcycled))
    assert tokens == dense_tokens
    # fp32: each block's k-way weighted combine rounds (w1 y + w2 y != y in the last bit) and an
    # expert's matmul over a subset of rows rounds differently from the dense one over all rows;
    # 30 blocks accumulate it: measured max |diff| 1.9e-5 to 2.2e-5 on logits of magnitude ~20.
    # The 1e-5 holds on the tiny 3-layer model (test_moe_upcycle.py), not here.
    torch.testing.assert_close(logits, dense_logits, rtol=0, atol=3e-5)
    # EP=2 is not possible for SmolLM2: expert parallelism runs on the tensor-parallel ranks and
    # its 9 attention heads do not split over 2; the upcycled tiny Llama covers EP=2 with replicas
    # (tests/e2e/test_moe_parallel.py)
