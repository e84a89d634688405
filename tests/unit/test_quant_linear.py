"""Weight-only int8 / int4 linear methods: each kernel against its dequantized reference, the
quantization error bound, TP slices (each rank quantizes its own slice), and bad input.

Tolerances: the kernels must equal ``x @ dequantized(W).T`` up to the activation dtype's
rounding: fp32 activations 1e-4 relative to the output scale; bf16 activations 2e-2 (bf16 has
8 bits of mantissa; the kernels accumulate in fp32 but round inputs and scales to bf16)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F

from fleetlm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from fleetlm.quantization.int4 import Int4LinearMethod, quantize_int4_groups
from fleetlm.quantization.int8 import Int8LinearMethod, quantize_int8_per_channel

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _layer(method, n: int, k: int, dtype: torch.dtype, w: torch.Tensor, bias: torch.Tensor | None = None):
    layer = ColumnParallelLinear(k, n, bias=bias is not None, dtype=dtype, linear_method=method)
    layer.weight_loader(layer.weight, w)
    if bias is not None:
        layer.weight_loader(layer.bias, bias)
    layer.process_weights_after_loading()
    return layer


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (got.float() - ref).abs().max() / ref.abs().max()
    assert err < TOL[dtype], f"relative error {err:.2e} over {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 33, 70])  # 70: the dequantize + GEMM path
def test_int8_matmul_equals_dequantized_reference(dtype, rows):
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(48, 96, generator=g), torch.randn(48, generator=g), torch.randn(rows, 96, generator=g)
    layer = _layer(Int8LinearMethod(), 48, 96, dtype, w, b)
    assert layer.qweight.dtype == torch.int8 and not hasattr(layer, "weight")
    deq = layer.linear_method.dequantized(layer)
    ref = F.linear(x.to(dtype).float(), deq, b.to(dtype).float())
    _close(layer(x.to(dtype)), ref, dtype)
    step = layer.scales.float()[:, None]
    # half a step; in bf16 the staged weight and the scale are rounded too (scale: 2^-9 relative, x127)
    bound = step * 0.501 if dtype == torch.float32 else step * 0.75 + w.abs() * 2**-8
    assert ((deq - w).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n", [48, 40])  # 40: the CPU packing pads rows to a multiple of 16
def test_int4_matmul_equals_dequantized_reference(dtype, group, n):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(n, 256, generator=g), torch.randn(3, 256, generator=g)
    layer = _layer(Int4LinearMethod(group), n, 256, dtype, w)
    xl = torch.randn(70, 256, generator=g).to(dtype)  # the dequantize + GEMM path equals the kernel's
    _close(layer(xl), F.linear(xl.float(), layer.linear_method.dequantized(layer)), dtype)
    q, s, z = quantize_int4_groups(w.to(dtype).float(), group)  # the layer stages the weight in its dtype
    deq = ((q.float().view(n, -1, group) - 8) * s[..., None] + z[..., None]).view(n, 256)
    err = (deq - w.to(dtype).float()).abs().view(n, -1, group).amax(-1)
    assert err.le(s / 2 * 1.001).all()  # half a step per group
    torch.testing.assert_close(layer.linear_method.dequantized(layer), deq.to(dtype).float(), rtol=0, atol=0.05)
    _close(layer(x.to(dtype)), F.linear(x.to(dtype).float(), deq), dtype)


def test_int8_per_channel_zero_row_and_extremes():
    w = torch.zeros(3, 8)
    w[1] = torch.linspace(-2, 2, 8)
    q, s = quantize_int8_per_channel(w)
    assert s[0] == 1 and (q[0] == 0).all()  # an all-zero row keeps a usable scale
    assert q[1].min() == -127 and q[1].max() == 127


def test_merged_layer_quantizes_after_every_shard_is_in():
    g = torch.Generator().manual_seed(2)
    gate, up, x = torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(2, 64, generator=g)
    layer = MergedColumnParallelLinear(64, [32, 32], dtype=torch.float32, linear_method=Int4LinearMethod(32))
    layer.weight_loader(layer.weight, gate, 0)
    layer.weight_loader(layer.weight, up, 1)
    layer.process_weights_after_loading()
    ref = F.linear(x, torch.cat([gate, up]))
    assert (layer(x) - ref).abs().max() / ref.abs().max() < 0.15  # int4: a coarse but bounded error


def test_unknown_quantization_and_bad_group_name_the_accepted_values():
    from fleetlm.config import EngineArgs
    from fleetlm.quantization.int4 import check_group_size

    with pytest.raises(ValueError, match="quantization 'int3' is not known; accepted: int8, int4"):
        EngineArgs(quantization="int3")
    with pytest.raises(ValueError, match=r"group size 128 does not divide the input size of L \(576 per rank\); "
                                         r"accepted here: 32, 64"):
        check_group_size(128, 576, "L")
    with pytest.raises(ValueError, match="int4 group size 16 is not supported; accepted: 32, 64, 128"):
        Int4LinearMethod(16).create_weights(torch.nn.Module(), 64, 32, torch.float32)


# -- tensor parallel: each rank quantizes its own slice ------------------------------------------
TP = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_case(rank: int, method_factory) -> None:
    g = torch.Generator().manual_seed(3)
    w1, w2, x = torch.randn(64, 64, generator=g), torch.randn(64, 128, generator=g), torch.randn(3, 64, generator=g)
    col = ColumnParallelLinear(64, 64, dtype=torch.float32, linear_method=method_factory())
    row = RowParallelLinear(128, 64, dtype=torch.float32, linear_method=method_factory())
    col.weight_loader(col.weight, w1)
    row.weight_loader(row.weight, w2)
    for layer in (col, row):
        layer.process_weights_after_loading()
    # the rank's kept weights are the quantization of its own slice
    own_col = _single(method_factory, w1[rank * 32 : (rank + 1) * 32])
    own_row = _single(method_factory, w2[:, rank * 64 : (rank + 1) * 64])
    torch.testing.assert_close(col.linear_method.dequantized(col), own_col)
    torch.testing.assert_close(row.linear_method.dequantized(row), own_row)
    h = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    y = row(h[:, rank * 64 : (rank + 1) * 64])  # all-reduced over the two ranks
    ref = sum(F.linear(h[:, r * 64 : (r + 1) * 64], _single(method_factory, w2[:, r * 64 : (r + 1) * 64]))
              for r in range(TP))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(col(x), F.linear(x, own_col), rtol=1e-4, atol=1e-4)


def _single(method_factory, w: torch.Tensor) -> torch.Tensor:
    m = method_factory()
    layer = torch.nn.Module()
    m.create_weights(layer, w.shape[1], w.shape[0], torch.float32)
    layer.weight.data.copy_(w)
    m.process_weights_after_loading(layer)
    return m.dequantized(layer)


def _tp_run(rank: int, port: int) -> None:
    from fleetlm.distributed.parallel_state import (
        ParallelConfig,
        destroy_distributed,
        init_distributed,
    )

    torch.set_num_threads(1)
    init_distributed(ParallelConfig(TP, 1), rank, torch.device("cpu"), init_method=f"tcp://127.0.0.1:{port}")
    try:
        _tp_case(rank, Int8LinearMethod)
        _tp_case(rank, lambda: Int4LinearMethod(32))
    finally:
        destroy_distributed()


def test_tp2_ranks_quantize_their_own_slices():
    torch.multiprocessing.spawn(_tp_run, args=(_port(),), nprocs=TP, join=True)


# -- W8A8 -------------------------------------------------------------------------------------------
def test_w8a8_int_matmul_equals_dequantized_operands():
    """Prefill rows take the int8 x int8 path: exactly (q_x s_x) @ (q_w s_w).T up to fp32 rounding
    of the epilogue (int32 accumulation is exact)."""
    from fleetlm.quantization.w8a8 import W8A8LinearMethod, quantize_rows

    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(48, 96, generator=g), torch.randn(40, 96, generator=g)
    layer = _layer(W8A8LinearMethod(True), 48, 96, torch.float32, w)
    xq, sx = quantize_rows(x)
    ref = F.linear(xq.float() * sx, layer.linear_method.dequantized(layer))
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-4)
    assert (layer(x) - F.linear(x, w)).abs().max() / F.linear(x, w).abs().max() < 0.03  # W8A8's own error


def test_w8a8_without_int8_units_falls_back_to_weight_only(monkeypatch):
    from fleetlm.quantization import w8a8

    monkeypatch.setattr(w8a8, "int8_matrix_units", lambda: ())
    method = w8a8.W8A8Config().linear_method("x")
    assert not method.use_int8_units
    g = torch.Generator().manual_seed(6)
    w, x = torch.randn(48, 96, generator=g), torch.randn(40, 96, generator=g)
    layer, ref = _layer(method, 48, 96, torch.float32, w), _layer(Int8LinearMethod(), 48, 96, torch.float32, w)
    torch.testing.assert_close(layer(x), ref(x))  # the same codes, the weight-only kernel


def test_int8_units_read_from_cpuinfo_flags(monkeypatch, tmp_path):
    from fleetlm.quantization import w8a8

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
    w8a8.int8_matrix_units.cache_clear()
    try:
        assert w8a8.int8_matrix_units() == ("avx512_vnni",)
    finally:
        w8a8.int8_matrix_units.cache_clear()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_compiled_int4_dequant_rounds_once_from_the_exact_weight(out_dtype):
    """``int4_dequant`` (the GEMM path's weight, csrc/cpu_ops.cpp) equals (q - 8) * s + z computed
    exactly and rounded to the output dtype (to one unit in the last place: the kernel's float32
    multiply-add may be fused), for bf16 scales as the packed layer keeps them; rounding the
    product and the sum in bf16 separately (the old path) is off by more."""
    from fleetlm.ops import cpu_ops

    ops = cpu_ops()
    if ops is None:
        pytest.skip("compiled CPU ops unavailable")
    g = torch.Generator().manual_seed(3)
    n, k, group = 40, 256, 32
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    sz = (torch.rand(k // group, n, 2, generator=g) - 0.5).to(torch.bfloat16)
    nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    exact = (q.double().view(n, -1, group) - 8) * sz[..., 0].double().t()[..., None] + sz[..., 1].double().t()[..., None]
    want = exact.view(n, k).to(out_dtype)
    got = ops.int4_dequant(nibbles, sz, group, out_dtype)
    ulp = 2.0**-7 if out_dtype == torch.bfloat16 else 2.0**-23
    assert ((got.double() - want.double()).abs() <= want.double().abs() * ulp + 1e-30).all()
    assert (got == want).float().mean() > 0.99
