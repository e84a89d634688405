"""GGUF blocks kept quantized: our block decoding against the gguf library's dequantization, and
the kernels that compute with them against the dequantized reference.

Tolerances: decoding is exact (codes and fp16 scales widened to fp32; ``zero = m + 8 d`` adds
one fp32 rounding). Matmuls in fp32 activations within 1e-4 of the output scale; bf16 within 2e-2
(scale and zero rounded to bf16 inside the int4 kernel)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from fleetlm.layers.linear import RowParallelLinear
from fleetlm.quantization.gguf import decode_blocks
from fleetlm.quantization.int4 import Int4LinearMethod, dequantize_int4
from fleetlm.quantization.int8_group import Int8GroupLinearMethod, dequantize_int8_groups


def _blocks(kind: str, rows: int = 48, cols: int = 128, seed: int = 0):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    raw = gguf.quants.quantize(w, T[kind])
    return raw, gguf.quants.dequantize(raw, T[kind]).reshape(rows, cols)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_decoded_blocks_equal_the_gguf_dequantization(kind):
    raw, ref = _blocks(kind)
    parts = {k: torch.from_numpy(v) for k, v in decode_blocks(raw, kind, 48, 128).items()}
    if kind == "Q8_0":
        got = dequantize_int8_groups(parts["qweight"], parts["scales"])
    else:
        assert int(parts["qweight"].max()) <= 15
        got = dequantize_int4(parts["qweight"], parts["scales"], parts["zeros"])
    torch.testing.assert_close(got, torch.from_numpy(ref), rtol=0, atol=1e-6)


def _kept_layer(kind: str, dtype: torch.dtype, raw: np.ndarray):
    method = Int8GroupLinearMethod(32) if kind == "Q8_0" else Int4LinearMethod(32, prequantized=True)
    layer = RowParallelLinear(128, 48, dtype=dtype, linear_method=method)
    for name, value in decode_blocks(raw, kind, 48, 128).items():
        layer.weight_loader(getattr(layer, name), torch.from_numpy(value))
    layer.process_weights_after_loading()
    return layer


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 12, 40])  # 12: Q8_0 kernel in tiles of 4 rows; 40: dequantize + GEMM
def test_kept_matmul_equals_dequantized_reference(kind, dtype, rows):
    raw, ref_w = _blocks(kind, seed=1)
    layer = _kept_layer(kind, dtype, raw)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = F.linear(x.float(), torch.from_numpy(ref_w))
    err = (layer(x).float() - ref).abs().max() / ref.abs().max()
    assert err < (1e-4 if dtype == torch.float32 else 2e-2), f"{err:.2e}"


def test_q4_1_scales_zero_point_convention():
    """Q4_1 ``w = q d + m`` becomes the int4 kernel's ``(q - 8) scale + zero``: zero = m + 8 d."""
    raw, _ = _blocks("Q4_1", rows=1, cols=32)
    d = raw[0, :2].copy().view(np.float16)[0]
    m = raw[0, 2:4].copy().view(np.float16)[0]
    parts = decode_blocks(raw, "Q4_1", 1, 32)
    assert parts["scales"][0, 0] == np.float32(d)
    assert parts["zeros"][0, 0] == np.float32(m) + 8 * np.float32(d)


def test_tied_q8_0_head_reads_its_embedding_for_many_rows():
    """A tied Q8_0 head computes few rows with the int8 kernel and many with the GEMM on the
    embedding table (the same weights dequantized); both agree with the fp32 reference."""
    from fleetlm.layers.vocab import VocabParallelEmbedding
    from fleetlm.quantization.lm_head import Int8GroupLMHead

    raw, ref_w = _blocks("Q8_0", rows=48, cols=128, seed=3)
    embed = VocabParallelEmbedding(48, 128, dtype=torch.bfloat16)
    embed.weight_loader(embed.weight, torch.from_numpy(ref_w))
    head = Int8GroupLMHead(48, 128, dtype=torch.bfloat16, tie_to=embed)
    for name, value in decode_blocks(raw, "Q8_0", 48, 128).items():
        getattr(head, name).data.copy_(torch.from_numpy(value))
    head.process_weights_after_loading()
    assert head.dense_twin() is embed.weight
    assert torch.equal(head.dense_twin(), head.method.dequantized(head).to(torch.bfloat16))
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ref = F.linear(x.float(), torch.from_numpy(ref_w))
    for rows in (3, 20):  # the kernel, then the GEMM on the twin
        err = (head.compute_logits(x[:rows]) - ref[:rows]).abs().max() / ref.abs().max()
        assert err < 2e-2, f"{rows} rows: {err:.2e}"
