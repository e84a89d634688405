"""The compiled CPU decode kernel agrees with the pure-PyTorch paged backend."""

import numpy as np
import pytest
import torch

from fleetlm.attention.base import BatchLayout
from fleetlm.attention.cpu_native import load_kernel
from fleetlm.attention.registry import get_attention_backend
from fleetlm.attention.torch_paged import TorchPagedBackend

kernel = load_kernel()
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


def test_backend_registry():
    cpu = torch.device("cpu")
    assert get_attention_backend("torch_paged", cpu, 16, torch.float32).name == "torch_paged"
    assert get_attention_backend("auto", cpu, 16, torch.float32).name == ("cpu_native" if kernel else "torch_paged")
    with pytest.raises(ValueError, match="not known"):
        get_attention_backend("flash9", cpu, 16, torch.float32)
