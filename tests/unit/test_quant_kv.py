"""Quantized KV caches (int8 with per token-and-head scales, fp8 e4m3): round-trip error
bounds, both attention backends (and the compiled decode kernel) against SDPA over the
dequantized cache, bytes equal to the planner's, and bad input.

Tolerances: int8 rows round to half a step (``max|x| / 254``) plus the fp16 rounding of the
scale; fp8 e4m3 keeps 3 mantissa bits (relative error <= 1/16) and saturates at ±448. Attention
outputs vs the reference over the same dequantized values: fp32 1e-4, bf16 2e-2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fleetlm.attention.base import BatchLayout
from fleetlm.attention.registry import get_attention_backend
from fleetlm.quantization.kv import kv_format


def test_int8_round_trip_within_half_a_step():
    fmt = kv_format("int8")
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    enc = fmt.encode(x)
    assert enc.dtype == torch.int8 and enc.shape == (50, 3, 66)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((fmt.decode(enc, torch.float32) - x).abs() <= step * 0.5 * 1.01 + 1e-6).all()


def test_fp8_round_trip_relative_and_saturating():
    fmt = kv_format("fp8_e4m3")
    x = torch.randn(40, 2, 32) * 8
    x[0, 0, 0] = 1000.0
    got = fmt.decode(fmt.encode(x), torch.float32)
    assert got[0, 0, 0] == 448.0
    inside = (x.abs() >= 2**-6) & (x.abs() <= 448)
    assert ((got - x).abs()[inside] <= x.abs()[inside] / 16).all()


def _decode_case(backend_name: str, kv_dtype: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bs, hkv, h, d, lens = 4, 2, 4, 64, [9, 4, 13]
    fmt = kv_format(kv_dtype)
    cache = torch.zeros(2, 16, bs, hkv, fmt.head_size(d), dtype=fmt.storage)
    table = np.zeros((3, 4), dtype=np.int64)
    perm = torch.randperm(15, generator=g)[:12].numpy() + 1
    for i, n in enumerate(lens):
        table[i, : -(-n // bs)] = perm[i * 4 : i * 4 + -(-n // bs)]
    kv_all = [torch.randn(2, n, hkv, d, generator=g).to(dtype) for n in lens]
    slots = [torch.from_numpy(table[i, np.arange(n) // bs] * bs + np.arange(n) % bs) for i, n in enumerate(lens)]
    for kv, sl in zip(kv_all, slots):  # the context (all tokens but the last)
        fmt.write(cache[0], sl[:-1], kv[0, :-1])
        fmt.write(cache[1], sl[:-1], kv[1, :-1])
    layout = BatchLayout(np.ones(3, dtype=np.int64), np.array(lens) - 1, table,
                         torch.stack([s[-1] for s in slots]), 3)
    backend = get_attention_backend(backend_name, torch.device("cpu"), bs, dtype, kv_dtype)
    meta = backend.build_metadata(layout, torch.device("cpu"))
    q = torch.randn(3, h, d, generator=g).to(dtype)
    out = backend.forward(q, torch.stack([kv[0, -1] for kv in kv_all]), torch.stack([kv[1, -1] for kv in kv_all]),
                          cache, meta)
    refs = []
    for i, kv in enumerate(kv_all):  # SDPA over the dequantized values of every token
        deq = fmt.decode(fmt.encode(kv), torch.float32)
        k, v = (deq[j].transpose(0, 1).repeat_interleave(h // hkv, 0) for j in (0, 1))
        refs.append(F.scaled_dot_product_attention(q[i].float()[:, None], k, v)[:, 0])
    return out.float(), torch.stack(refs)


@pytest.mark.parametrize("backend", ["torch_paged", "cpu_native"])
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_reads_the_quantized_cache(backend, kv_dtype, dtype):
    from fleetlm.ops import cpu_ops

    if backend == "cpu_native" and cpu_ops() is None:
        pytest.skip("compiled CPU ops unavailable")
    got, ref = _decode_case(backend, kv_dtype, dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (got - ref).abs().max() < tol * ref.abs().max().clamp(min=1)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_engine_kv_bytes_equal_the_planners(tiny_model_dir, kv_dtype):
    from fleetlm import LLM
    from fleetlm.plan.memory import kv_bytes_per_token
    from fleetlm.plan.model_load import spec_from_config_file

    llm = LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory=8 << 20, kv_cache_dtype=kv_dtype)
    worker = llm.engine.core.executor.worker
    per_token = kv_bytes_per_token(spec_from_config_file(tiny_model_dir / "config.json"), kv_dtype)
    assert worker.kv_bytes_per_token() == per_token  # 3 layers x 2 x 2 heads x (16 + 2 B scale) for int8
    assert worker.kv_cache_bytes() == worker.runner.kv_cache.shape[2] * 16 * per_token
    assert worker.runner.kv_cache.shape[2] == (8 << 20) // (16 * per_token)


def test_unknown_kv_dtype_names_the_accepted_values():
    from fleetlm.config import EngineArgs

    with pytest.raises(ValueError, match="kv_cache_dtype 'int4' is not known; accepted: auto, int8, fp8_e4m3"):
        EngineArgs(kv_cache_dtype="int4")
