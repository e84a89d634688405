"""The compiled bf16 decode GEMV (csrc/gemv.cpp) against an fp32 reference, and when
``layers.gemv.linear`` takes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fleetlm.layers import gemv
from fleetlm.ops import cpu_ops

ops = cpu_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="compiled CPU ops unavailable")


def _close_to_reference(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Float accumulation rounded once: within one bf16 rounding of the fp32 result (plus the
    float-order slack of a long dot product)."""
    assert y.dtype is torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=2e-3)


@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (1, 1536, 576), (3, 100, 37), (4, 64, 5), (8, 33, 131), (2, 31, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_fp32_reference(m: int, k: int, n: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if with_bias else None
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    _close_to_reference(ops.bf16_gemv(x, w, b), ref)


def test_gemv_reads_a_row_strided_weight() -> None:
    """A weight that is a column slice of a wider matrix (rows not back to back) is read in place."""
    full = torch.randn(64, 96).bfloat16()
    w, x = full[:, 16:80], torch.randn(2, 64).bfloat16()
    assert not w.is_contiguous() and w.stride(1) == 1
    _close_to_reference(ops.bf16_gemv(x, w, None), F.linear(x.float(), w.float()))


def test_gemv_refuses_bad_shapes() -> None:
    w = torch.randn(8, 16).bfloat16()
    with pytest.raises(RuntimeError, match="input rows"):
        ops.bf16_gemv(torch.randn(9, 16).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="columns"):
        ops.bf16_gemv(torch.randn(1, 15).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="bf16"):
        ops.bf16_gemv(torch.randn(1, 16), w, None)


def test_linear_routes_only_decode_sized_bf16_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ops.bf16_gemv

    class Spy:
        def bf16_gemv(self, *a):
            calls.append(a[0].shape)
            return real(*a)

    monkeypatch.setattr(gemv, "_KERNEL", [Spy()])
    w = torch.randn(24, 32).bfloat16()
    y = gemv.linear(torch.randn(1, 1, 32).bfloat16(), w)  # [batch, tokens, hidden] keeps its shape
    assert y.shape == (1, 1, 24) and calls == [(1, 32)]
    gemv.linear(torch.randn(gemv.GEMV_ROWS + 1, 32).bfloat16(), w)  # prefill-sized: the GEMM
    gemv.linear(torch.randn(1, 32), w.float())  # fp32: the reference path
    wg = w.clone().requires_grad_(True)
    out = gemv.linear(torch.randn(1, 32).bfloat16(), wg)  # training: differentiable path
    out.sum().backward()
    assert calls == [(1, 32)] and wg.grad is not None
    with torch.no_grad():
        gemv.linear(torch.randn(2, 32).bfloat16(), wg)
    assert calls == [(1, 32), (2, 32)]


@pytest.mark.slow
def test_gemv_avx512f_path(tmp_path) -> None:
    """The path AVX-512 machines without BF16 compile gives the same values (without AVX-512 the
    GEMV is not used: ``layers/gemv.py`` keeps F.linear)."""
    from pathlib import Path

    from torch.utils.cpp_extension import load

    src = Path(gemv.__file__).parents[1] / "csrc" / "gemv.cpp"
    mod_src = tmp_path / "mod.cpp"
    mod_src.write_text(f'#include "{src}"\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{ m.def("f", &bf16_gemv); '
                       'm.def("isa", &gemv_isa); }\n')
    mod = load(name="gemv_avx512f", sources=[str(mod_src)], build_directory=str(tmp_path),
               extra_cflags=["-O2", "-march=native", "-mno-avx512bf16"], verbose=False)
    assert mod.isa() in ("avx512f", "portable")
    for m, k, n in [(1, 576, 96), (3, 100, 37), (8, 33, 5)]:
        x, w, b = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16()
        _close_to_reference(mod.f(x, w, b), F.linear(x.float(), w.float(), b.float()))


def test_larger_bf16_inputs_use_a_prepacked_weight_that_follows_in_place_changes(monkeypatch) -> None:
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("no oneDNN bf16 kernels on this machine")
    monkeypatch.setattr(gemv, "_PREPACK", [True])
    g = torch.Generator().manual_seed(7)
    owner = torch.nn.Linear(96, 40).bfloat16().requires_grad_(False)
    owner.weight.copy_(torch.randn(40, 96, generator=g))
    x = torch.randn(3, 6, 96, generator=g).bfloat16()  # 18 rows, more than GEMV_ROWS
    y = gemv.linear(x, owner.weight, owner.bias, owner)
    assert y.shape == (3, 6, 40) and hasattr(owner, "_prepacked")
    _close_to_reference(y.reshape(18, 40), x.reshape(18, 96).float() @ owner.weight.float().T + owner.bias.float())
    packed = owner._prepacked[1]
    gemv.linear(x, owner.weight, None, owner)
    assert owner._prepacked[1] is packed  # reused while the weight is unchanged
    with torch.no_grad():
        owner.weight.mul_(-2)  # e.g. new weights loaded in place
    y2 = gemv.linear(x, owner.weight, None, owner)
    assert owner._prepacked[1] is not packed
    _close_to_reference(y2.reshape(18, 40), x.reshape(18, 96).float() @ owner.weight.float().T)
    monkeypatch.setattr(gemv, "_PREPACK", [False])  # FLEETLM_PREPACK=0: plain F.linear
    assert torch.equal(gemv.linear(x, owner.weight, None, owner), F.linear(x, owner.weight))
