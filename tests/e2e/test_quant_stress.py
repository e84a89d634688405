"""Each quantization format under pressure (tiny random Llama, fp32 activations): prefix caching,
chunked prefill and preemption. Every request finishes, greedy outputs equal an unconstrained run
of the same format, and every KV block returns to the pool."""

import pytest

from fleetlm import LLM
from tests.e2e.test_stress import _workload


def check_format_under_pressure(model: str, prompts, params, fmt: dict, dtype: str = "float32", **small) -> None:
    free = LLM(model, dtype=dtype, kv_cache_memory=64 << 20, **fmt)
    expected = [o.outputs[0].token_ids for o in free.generate(prompts, params, use_tqdm=False)]
    tight = LLM(model, dtype=dtype, **fmt, **small)
    sched = tight.engine.core.scheduler
    start = sched.kv.num_free_blocks
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert sched.num_preemptions > 0, "the cache was not small enough to force preemption"
    assert all(o.finished and o.error is None for o in outs)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert sched.kv.num_free_blocks == start
    assert not sched.requests and not tight.engine.output_processor.parents


@pytest.mark.parametrize("fmt", [{"quantization": "int8"}, {"quantization": "int4_g32"}],
                         ids=lambda f: "-".join(map(str, f.values())))
def test_random_requests_under_pressure_per_format(tiny_model_dir, fmt):
    prompts, params = _workload(30, seed=3)
    prompts += prompts[:6]  # repeated prompts: prefix-cache hits
    params += params[:6]
    check_format_under_pressure(str(tiny_model_dir), prompts, params, fmt,
                                num_kv_blocks=16, block_size=8, max_num_batched_tokens=64)
