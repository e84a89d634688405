"""Each quantization format under pressure (tiny random Llama, fp32 activations): prefix caching,
chunked prefill and preemption. Every request finishes, greedy outputs equal an unconstrained run
of the same format, and every KV block returns to the pool.

Quantized KV caches: a prefill attends to its own fresh K/V unquantized but to cached context
quantized, so chunking and recompute after preemption change numerics by design; there the
outputs must agree for most requests (>= 80%) rather than all. The same holds for W8A8, whose
int8-activation path serves steps of >= 32 rows and the weight-only path smaller ones: how a
prompt is chunked decides which rounding its tokens get."""

import pytest

from fleetlm import LLM
from tests.e2e.test_stress import _workload


def check_format_under_pressure(model: str, prompts, params, fmt: dict, dtype: str = "float32",
                                min_identical: float = 1.0, **small) -> None:
    free = LLM(model, dtype=dtype, kv_cache_memory=64 << 20, **fmt)
    expected = [o.outputs[0].token_ids for o in free.generate(prompts, params, use_tqdm=False)]
    tight = LLM(model, dtype=dtype, **fmt, **small)
    sched = tight.engine.core.scheduler
    start = sched.kv.num_free_blocks
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert sched.num_preemptions > 0, "the cache was not small enough to force preemption"
    assert all(o.finished and o.error is None for o in outs)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    same = sum(o.outputs[0].token_ids == e for o, e in zip(outs, expected)) / len(outs)
    assert same >= min_identical, f"{same:.0%} of requests identical to the unconstrained run"
    assert sched.kv.num_free_blocks == start
    assert not sched.requests and not tight.engine.output_processor.parents


@pytest.mark.parametrize("fmt", [{"quantization": "int8"}, {"quantization": "int4_g32"}, {"quantization": "w8a8"},
                                 {"kv_cache_dtype": "int8"}, {"kv_cache_dtype": "fp8_e4m3"}],
                         ids=lambda f: "-".join(map(str, f.values())))
def test_random_requests_under_pressure_per_format(tiny_model_dir, fmt):
    prompts, params = _workload(30, seed=3)
    prompts += prompts[:6]  # repeated prompts: prefix-cache hits
    params += params[:6]
    exact = "kv_cache_dtype" not in fmt and fmt.get("quantization") != "w8a8"
    check_format_under_pressure(str(tiny_model_dir), prompts, params, fmt, min_identical=1.0 if exact else 0.8,
                                num_kv_blocks=16, block_size=8, max_num_batched_tokens=64)
