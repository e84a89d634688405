"""The decode kernels with int8 activations (``csrc/int4_q8.cpp``, ``csrc/int8_q8.cpp``) against
their definition, and where ``Int4LinearMethod`` and ``Int8GroupLinearMethod`` use them.

Definition: each input row is rounded to int8 per 32 values (``round(x * 127 / amax)``, scale
``amax / 127``), then multiplied with the dequantized weight: int4 ``scale * q + (zero - 8 *
scale)`` (scale and that minimum in fp16), group-wise int8 ``scale * q`` (fp32 scales). The reference does the same rounding in torch and the products in
float64, so the kernel must agree to float32 summation error, except where ``x * 127 / amax`` lies
within 1e-4 of a half-way point (common with bf16 inputs, where exact ties occur): the kernel is
built with -ffast-math, which may compute ``127 / amax`` through a reciprocal, a last-bit difference
that rounds those the other way. The checks allow one code step there and nothing more.
"""

from __future__ import annotations

import pytest
import torch

from fleetlm.ops import cpu_ops
from fleetlm.quantization.base import int8_activation_kernels
from fleetlm.quantization.int4 import INT4_GEMM_ROWS, INT4_Q8_ROWS, Int4LinearMethod
from fleetlm.quantization.int8_group import Int8GroupLinearMethod

OPS = cpu_ops()
pytestmark = pytest.mark.skipif(OPS is None, reason="compiled CPU ops unavailable")


def quantized_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8-rounded activations, dequantized, and where the rounding is borderline the scale (else 0)."""
    m, k = x.shape
    xf = x.float().reshape(m, k // 32, 32)
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    v = xf * inv
    tie = ((v - v.floor()) - 0.5).abs() < 1e-4
    dx = (amax / 127.0).expand_as(xf)
    return (torch.round(v) * dx).reshape(m, k), torch.where(tie, dx, 0.0).reshape(m, k)


def reference(x, codes, scales, mins, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition's result in float64, and per output what rounding its ties the other way may
    move it. ``mins`` None: symmetric int8 codes."""
    w = scales.double().repeat_interleave(group, 1) * codes.double()
    if mins is not None:
        w = w + mins.double().repeat_interleave(group, 1)
    xd, ties = quantized_activations(x)
    return xd.double() @ w.T, ties.double() @ w.abs().T


def random_layer(n: int, k: int, group: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half()
    mins = (-torch.rand(n, k // group, generator=g) * 0.1).half()
    return codes, nibbles, scales, mins


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("n", "k", "group", "rows"), [
    (37, 576, 32, 1),     # a 64-weight tail chunk; weight rows not a multiple of the 4 taken together
    (64, 512, 32, 2),     # whole 128-weight chunks only
    (45, 1536, 64, 3),    # group 64; one weight row at a time from 3 input rows
    (32, 512, 128, 9),    # group 128; a tile of 8 input rows, then one of 1
    (23, 576, 64, 17),    # group 64 with a tail; three tiles
])
def test_kernel_equals_its_definition(threads, n, k, group, rows):
    codes, nibbles, scales, mins = random_layer(n, k, group, seed=n + rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
    x[0, 32:64] = 0  # an all-zero block: scale 0, no division by it
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y32 = OPS.int4_q8_linear(x, nibbles, scales, mins, group)
        y16 = OPS.int4_q8_linear(x.bfloat16(), nibbles, scales, mins, group)
    finally:
        torch.set_num_threads(before)
    ref, ties = reference(x, codes, scales, mins, group)
    scale = ref.abs().max().item()
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
    assert (y32.double() - ref).abs().max() <= 2e-6 * scale + ties.max()  # random fp32: ties are rare
    ref16, ties16 = reference(x.bfloat16(), codes, scales, mins, group)  # the bf16 input rounds first
    bound = 2 ** -8 * ref16.abs() + 2e-6 * scale + ties16  # bf16 output rounding + float sums + ties
    assert ((y16.double() - ref16).abs() <= bound).all()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("n", "k", "group", "rows"), [
    (37, 576, 32, 1),     # weight rows not a multiple of the 4 taken together
    (64, 512, 16, 2),     # Q6_K's group of 16
    (45, 1536, 32, 3),    # one weight row at a time from 3 input rows
    (23, 576, 16, 17),    # three tiles
    (41, 576, 576, 1),    # one scale per output row (the int8 format)
    (20, 1536, 1536, 5),
])
def test_int8_kernel_equals_its_definition(threads, n, k, group, rows):
    g = torch.Generator().manual_seed(n + rows)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.01
    x = torch.randn(rows, k, generator=g) * 3
    x[0, :32] = 0
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y32 = OPS.int8_q8_linear(x, codes, scales, group)
        y16 = OPS.int8_q8_linear(x.bfloat16(), codes, scales, group)
    finally:
        torch.set_num_threads(before)
    ref, ties = reference(x, codes, scales, None, group)
    scale = ref.abs().max().item()
    assert (y32.double() - ref).abs().max() <= 2e-6 * scale + ties.max()
    ref16, ties16 = reference(x.bfloat16(), codes, scales, None, group)
    assert ((y16.double() - ref16).abs() <= 2 ** -8 * ref16.abs() + 2e-6 * scale + ties16).all()


def test_kernel_rejects_what_it_cannot_do():
    _, nibbles, scales, mins = random_layer(8, 96, 32, seed=0)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        OPS.int4_q8_linear(torch.randn(1, 96), nibbles, scales, mins, 32)
    _, nibbles, scales, mins = random_layer(8, 128, 32, seed=0)
    with pytest.raises(RuntimeError, match="group 32, 64 or 128"):
        OPS.int4_q8_linear(torch.randn(1, 128), nibbles, scales, mins, 16)
    with pytest.raises(RuntimeError, match="fp16"):
        OPS.int4_q8_linear(torch.randn(1, 128), nibbles, scales.float(), mins, 32)
    codes = torch.zeros(8, 96, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        OPS.int8_q8_linear(torch.randn(1, 96), codes, torch.ones(8, 3), 32)
    with pytest.raises(RuntimeError, match="group 16, 32 or K"):
        OPS.int8_q8_linear(torch.randn(1, 128), torch.zeros(8, 128, dtype=torch.int8), torch.ones(8, 2), 64)


def make_layer(n: int, k: int, seed: int = 0):
    layer, method = torch.nn.Module(), Int4LinearMethod(32)
    method.create_weights(layer, k, n, torch.bfloat16)
    layer.weight.data.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05)
    method.process_weights_after_loading(layer)
    return layer, method


def test_linear_method_takes_the_int8_path_for_decode_rows_only():
    layer, method = make_layer(50, 576)  # 50 rows: padded to 64 inside, sliced back
    w = method.dequantized(layer)
    assert w.shape == (50, 576)
    vnni = OPS.q8_isa() == "avx512vnni"
    assert hasattr(layer, "q8_kernel") == vnni and hasattr(layer, "packed") != vnni
    g = torch.Generator().manual_seed(1)
    for rows in (1, INT4_GEMM_ROWS, INT4_Q8_ROWS - 1, INT4_Q8_ROWS):
        x = torch.randn(rows, 576, generator=g).bfloat16()
        y = method.apply(layer, x, None)
        assert y.shape == (rows, 50)
        if rows < INT4_Q8_ROWS and vnni:  # exactly the kernel, on the layer's fp16 scales
            want = OPS.int4_q8_linear(x, layer.nibbles, layer.q8_scales, layer.q8_mins, 32)[:, :50]
            assert torch.equal(y, want)
            exact = x.double() @ w.double().T  # no activation rounding
            # the int8 activations cost ~0.4% of a block's largest value per element
            assert (y.double() - exact).abs().max() <= 0.02 * exact.abs().max()
        elif rows >= INT4_GEMM_ROWS:  # no kernel for these rows: the bf16 GEMM on the dequantized weight
            torch.testing.assert_close(y, torch.nn.functional.linear(x, w.bfloat16()))
    x = torch.randn(3, 576, generator=g)  # fp32 input: the GEMM path, no activation rounding
    torch.testing.assert_close(method.apply(layer, x, None), x @ w.T, rtol=1e-5, atol=1e-5)


def test_an_input_size_the_kernel_cannot_take_keeps_torch_s_kernel():
    layer, method = make_layer(16, 96)  # 96 is not a multiple of 64
    assert not hasattr(layer, "q8_kernel") and hasattr(layer, "packed")
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(2)).bfloat16()
    want = x.float() @ method.dequantized(layer).T
    torch.testing.assert_close(method.apply(layer, x, None).float(), want, rtol=2e-2, atol=2e-2)


def test_the_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("FLEETLM_INT8_ACTIVATIONS", "0")
    layer, method = make_layer(16, 128)
    assert not hasattr(layer, "q8_kernel") and hasattr(layer, "packed")
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    want = torch._weight_int4pack_mm_for_cpu(x, layer.packed, 32, layer.scales_zeros)[:, :16]
    assert torch.equal(method.apply(layer, x, None), want)


def test_int8_group_method_takes_the_int8_path_for_bf16_decode_rows():
    layer, method = torch.nn.Module(), Int8GroupLinearMethod(32)
    method.create_weights(layer, 576, 40, torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    layer.qweight.data.copy_(torch.randint(-127, 128, (40, 576), dtype=torch.int8, generator=g))
    layer.scales.data.copy_(torch.rand(40, 18, generator=g) * 0.01)
    method.process_weights_after_loading(layer)
    vnni = int8_activation_kernels() is not None
    assert (getattr(layer, "q8_kernel", None) is not None) == vnni
    w = method.dequantized(layer)
    x = torch.randn(2, 576, generator=g)
    y16 = method.apply(layer, x.bfloat16(), None)
    if vnni:
        assert torch.equal(y16, OPS.int8_q8_linear(x.bfloat16(), layer.qweight, layer.scales, 32))
    exact = x.bfloat16().double() @ w.double().T
    assert (y16.double() - exact).abs().max() <= 0.02 * exact.abs().max()
    # fp32 input: fp32 activations, no rounding
    torch.testing.assert_close(method.apply(layer, x, None), x @ w.T, rtol=1e-5, atol=1e-4)


def test_per_channel_int8_takes_the_int8_path_for_bf16_decode_rows():
    from fleetlm.quantization.int8 import GEMM_ROWS, Q8_ROWS, int8_linear, quantize_int8_per_channel

    g = torch.Generator().manual_seed(5)
    q, scale = quantize_int8_per_channel(torch.randn(48, 576, generator=g) * 0.05)
    scale16 = scale.bfloat16()
    w = q.double() * scale16.double()[:, None]
    for rows in (1, Q8_ROWS - 1, Q8_ROWS, GEMM_ROWS):
        x = torch.randn(rows, 576, generator=g).bfloat16()
        y = int8_linear(x, q, scale16)
        if rows < Q8_ROWS and int8_activation_kernels() is not None:
            assert torch.equal(y, OPS.int8_q8_linear(x, q, scale16.float()[:, None], 576))
        elif rows < GEMM_ROWS:
            assert torch.equal(y, torch._weight_int8pack_mm(x, q, scale16))
        exact = x.double() @ w.T
        assert (y.double() - exact).abs().max() <= 0.02 * exact.abs().max()
