"""The compiled CPU ops agree with the pure-PyTorch reference code."""

import numpy as np
import pytest
import torch

from fleetlm.attention.base import BatchLayout
from fleetlm.attention.registry import get_attention_backend
from fleetlm.attention.torch_paged import TorchPagedBackend
from fleetlm.ops import cpu_ops

kernel = cpu_ops()
needs_kernel = pytest.mark.skipif(kernel is None, reason="no C++ toolchain to build the kernel")


def _case(dtype, b=7, h=9, hkv=3, d=64, bs=16, nb_total=64, seed=0):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, nb_total, bs, hkv, d, generator=g).to(dtype)
    lens = rng.integers(1, 120, b)
    width = int(-(-lens.max() // bs))
    table = rng.permutation(nb_total)[: b * width].reshape(b, width).astype(np.int64)
    q = torch.randn(b, h, d, generator=g).to(dtype)
    layout = BatchLayout(np.ones(b, dtype=np.int64), lens - 1, table, torch.zeros(b, dtype=torch.long), b)
    return q, kv, table, lens, layout


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_kernel_matches_torch_backend(dtype, tol):
    q, kv, table, lens, layout = _case(dtype)
    ref_backend = TorchPagedBackend(16, dtype)
    ref = ref_backend._decode(q, kv, ref_backend.build_metadata(layout, torch.device("cpu")))
    got = kernel.paged_decode(q, kv, torch.from_numpy(table), torch.from_numpy(lens), 64 ** -0.5)
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


@needs_kernel
def test_decode_kernel_handles_other_head_shapes():
    q, kv, table, lens, layout = _case(torch.float32, h=4, hkv=4, d=48)
    ref_backend = TorchPagedBackend(16, torch.float32)
    ref = ref_backend._decode(q, kv, ref_backend.build_metadata(layout, torch.device("cpu")))
    got = kernel.paged_decode(q, kv, torch.from_numpy(table), torch.from_numpy(lens), 48 ** -0.5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _reference_decode(q, kv, table, lens):
    """Float64 attention of each query row over its first ``lens[b]`` cached tokens."""
    b, h, d = q.shape
    _, _, bs, hkv, _ = kv.shape
    out = torch.empty(b, h, d, dtype=torch.float64)
    for i in range(b):
        rows = kv[:, torch.from_numpy(table[i])].reshape(2, -1, hkv, d)[:, : lens[i]].double()
        k, v = rows[0].repeat_interleave(h // hkv, 1), rows[1].repeat_interleave(h // hkv, 1)
        p = torch.einsum("hd,thd->ht", q[i].double() * d ** -0.5, k).softmax(-1)
        out[i] = torch.einsum("ht,thd->hd", p, v)
    return out


@needs_kernel
@pytest.mark.parametrize("dtype,d,bs", [(torch.bfloat16, 64, 16), (torch.bfloat16, 128, 32), (torch.bfloat16, 32, 8),
                                        (torch.bfloat16, 96, 16), (torch.float16, 64, 16), (torch.float32, 80, 16)])
def test_decode_kernel_long_and_ragged_contexts(dtype, d, bs):
    """Contexts split into chunks across threads (a batch of one, 2,500 tokens) and a ragged batch
    whose short rows have empty chunks: both equal the float64 reference."""
    g = torch.Generator().manual_seed(1)
    nb = 400
    kv = torch.randn(2, nb, bs, 2, d, generator=g).to(dtype)
    perm = np.random.default_rng(1).permutation(nb).astype(np.int64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    threads_before = torch.get_num_threads()
    try:
        for lens in (np.array([2500]), np.array([1, 900, 17, 2, 33])):
            width = int(-(-lens.max() // bs))
            table = np.stack([np.roll(perm, 7 * i)[:width] for i in range(len(lens))])
            q = torch.randn(len(lens), 8, d, generator=g).to(dtype)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                got = kernel.paged_decode(q, kv, torch.from_numpy(table), torch.from_numpy(lens), d ** -0.5)
                torch.testing.assert_close(got.double(), _reference_decode(q, kv, table, lens), rtol=tol, atol=tol)
    finally:
        torch.set_num_threads(threads_before)


@needs_kernel
def test_decode_kernel_rejects_an_empty_context():
    q, kv, table, lens, _ = _case(torch.float32, b=2)
    lens[1] = 0
    with pytest.raises(RuntimeError, match="every sequence needs a cached token"):
        kernel.paged_decode(q, kv, torch.from_numpy(table), torch.from_numpy(lens), 64 ** -0.5)


def test_backend_registry():
    cpu = torch.device("cpu")
    assert get_attention_backend("torch_paged", cpu, 16, torch.float32).name == "torch_paged"
    assert get_attention_backend("auto", cpu, 16, torch.float32).name == ("cpu_native" if kernel else "torch_paged")
    with pytest.raises(ValueError, match="not known"):
        get_attention_backend("flash9", cpu, 16, torch.float32)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_elementwise_ops_match_the_reference_layers(dtype):
    from fleetlm.layers.norm import RMSNorm
    from fleetlm.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(0)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    x = torch.randn(5, 96, generator=g).to(dtype)
    res = torch.randn(5, 96, generator=g).to(dtype)
    norm = RMSNorm(96, 1e-5, dtype)
    norm.ops = None  # the reference formula
    norm.weight.data = torch.rand(96, generator=g).to(dtype) + 0.5
    expected_res = res + x
    expected = norm(expected_res.float()).to(dtype)
    h, r = x.clone(), res.clone()
    kernel.add_rms_norm_(h, r, norm.weight, 1e-5)
    torch.testing.assert_close(r, expected_res, rtol=tol, atol=tol)
    torch.testing.assert_close(h.float(), expected.float(), rtol=tol, atol=tol)

    rope = RotaryEmbedding(16, 64, 10000.0, None, dtype)
    rope.ops = None  # the reference formula
    pos = torch.tensor([0, 3, 7, 63, 1])
    qkv = torch.randn(5, 7 * 16, generator=g).to(dtype)  # 5 rotated heads then 2 untouched
    expected = rope(pos, qkv.clone(), 5)[:, :5]
    got = qkv.clone()
    kernel.rope_(got, 5, 16, rope.cos, rope.sin_signed, pos)
    torch.testing.assert_close(got.view(5, 7, 16)[:, :5].float(), expected.float(), rtol=tol, atol=tol)
    assert torch.equal(got.view(5, 7, 16)[:, 5:], qkv.view(5, 7, 16)[:, 5:])

    gate_up = torch.randn(5, 64, generator=g).to(dtype)
    expected = torch.nn.functional.silu(gate_up[:, :32].float()) * gate_up[:, 32:].float()
    torch.testing.assert_close(kernel.silu_and_mul(gate_up).float(), expected, rtol=tol, atol=tol)


@needs_kernel
def test_fused_model_path_matches_the_reference_path(tiny_model_dir):
    from fleetlm import LLM, SamplingParams

    llm = LLM(str(tiny_model_dir), dtype="bfloat16", kv_cache_memory=16 << 20)
    model = llm.engine.core.executor.worker.runner.model
    fused_layers = [m for m in model.modules() if getattr(m, "ops", None) is not None]
    assert len(fused_layers) == 3 * 3 + 2  # bf16 on CPU: 2 norms + SiLU*mul per layer, rotary, final norm
    sp = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    prompts = [{"prompt_token_ids": list(range(100, 140))}, {"prompt_token_ids": [5, 6, 7]}]
    fused = llm.generate(prompts, sp, use_tqdm=False)
    llm.engine.core.scheduler.kv.reset_prefix_cache()
    for m in fused_layers:  # the same layers on their reference formulas
        m.ops = None
    plain = llm.generate(prompts, sp, use_tqdm=False)
    for a, b in zip(fused, plain):
        la, lb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        common = set(la) & set(lb)
        assert len(common) >= 4
        for t in common:
            assert abs(la[t].logprob - lb[t].logprob) < 0.1
