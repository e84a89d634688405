"""Invariants under pressure: random requests, a KV cache small enough to force preemption.
Every request finishes, greedy outputs equal those of an unconstrained run, and every KV block
returns to the pool."""

import numpy as np
import pytest

from fleetlm import LLM, SamplingParams


def _workload(n, seed, vocab=49152, max_prompt=96, max_out=24):
    rng = np.random.default_rng(seed)
    prompts = [{"prompt_token_ids": rng.integers(3, vocab, int(rng.integers(1, max_prompt))).tolist()} for _ in range(n)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, max_out)), temperature=0, ignore_eos=True) for _ in range(n)]
    return prompts, params


def _check_under_pressure(model, prompts, params, **small):
    free = LLM(model, dtype="float32", kv_cache_memory=64 << 20)
    expected = [o.outputs[0].token_ids for o in free.generate(prompts, params, use_tqdm=False)]
    tight = LLM(model, dtype="float32", **small)
    sched = tight.engine.core.scheduler
    start = sched.kv.num_free_blocks
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert sched.num_preemptions > 0, "the cache was not small enough to force preemption"
    assert all(o.finished and o.error is None for o in outs)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert sched.kv.num_free_blocks == start
    assert not sched.requests and not tight.engine.output_processor.parents


def test_200_random_requests_tiny_model(tiny_model_dir):
    prompts, params = _workload(200, seed=1)
    _check_under_pressure(str(tiny_model_dir), prompts, params, num_kv_blocks=24, block_size=8, max_num_batched_tokens=128)


@pytest.mark.slow
def test_preemption_on_the_real_model():
    prompts, params = _workload(40, seed=2, max_prompt=64, max_out=32)
    _check_under_pressure("smollm2-135m-instruct", prompts, params, num_kv_blocks=16, block_size=16, max_num_batched_tokens=256)
