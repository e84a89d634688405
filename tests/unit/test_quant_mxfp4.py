"""MXFP4 (OCP microscaling FP4, GGUF ``MXFP4``) kept quantized: our block decoding against the
gguf library's dequantization, the compiled kernels and the torch fallback against the
dequantized reference, MoE experts and a dense layer computing with them, tiny Mixtral and
Qwen2-MoE GGUFs whose experts stay MXFP4, and the layer's TP / EP / replica layouts on 2 gloo
ranks.

Tolerances: decoding and ``mxfp4_dequant`` are exact (every MXFP4 weight is a small integer times
a power of two: exact in fp32 and bf16). ``mxfp4_linear`` sums in fp32 in another order than
torch's GEMM: within 1e-5 of the output scale for fp32 activations; bf16 outputs are rounded
once to bf16 (and the GEMM path accumulates in its own order): within 1e-2."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fleetlm.quantization import mxfp4 as mx
from tests.moe_helpers import make_tiny_moe_dir, write_moe_gguf
from tests.unit.test_gguf_moe import PROMPTS
from tests.unit.test_moe_layer import _port, _reference

MXFP4 = gguf.GGMLQuantizationType.MXFP4


def _blocks(rows: int = 48, cols: int = 256, seed: int = 0):
    """Random MXFP4 blocks (rows at scales 2^-12 .. 2^12, one all-zero row) and gguf's dequantization."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.exp2(rng.integers(-12, 13, (rows, 1)))
    w[3] = 0.0
    raw = gguf.quants.quantize(w.astype(np.float32), MXFP4)
    return raw, gguf.quants.dequantize(raw, MXFP4).reshape(rows, cols)


def test_decoded_blocks_equal_the_gguf_dequantization():
    raw, ref = _blocks()
    assert raw.shape == (48, 256 // 32 * 17)
    codes, scales = mx.decode_blocks(raw, 48, 256)
    assert codes.shape == (48, 128) and scales.shape == (48, 8) and codes.dtype == scales.dtype == torch.uint8
    assert int(mx.unpack_codes(codes).max()) <= 15
    assert torch.equal(mx.dequantize_mxfp4(codes, scales), torch.from_numpy(ref))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # gguf's own inf
def test_every_byte_decodes_as_gguf_does():
    """Random bytes: every exponent 0..255 (ggml's half scale: denormal below 2, finite at 255,
    times 12 overflowing to inf as in gguf) and every code."""
    raw = np.random.default_rng(1).integers(0, 256, (64, 8 * 17), dtype=np.uint8)
    raw[:, ::17] = np.arange(256, dtype=np.uint8).reshape(64, 4).repeat(2, axis=1)
    ref = gguf.quants.dequantize(raw, MXFP4).reshape(64, 256)
    got = mx.dequantize_mxfp4(*mx.decode_blocks(raw, 64, 256)).numpy()
    np.testing.assert_array_equal(got, ref)


def _ops():
    from fleetlm.ops import cpu_ops

    ops = cpu_ops()
    if ops is None or not hasattr(ops, "mxfp4_linear"):
        pytest.skip("compiled CPU ops unavailable")
    return ops


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_dequant_is_exact(dtype):
    ops = _ops()
    raw, ref = _blocks(seed=2)
    codes, scales = mx.decode_blocks(raw, 48, 256)
    if dtype == torch.float16:  # its range: keep the scales small
        codes, scales = codes[:8], torch.full_like(scales[:8], 127)
        ref = mx.dequantize_mxfp4(codes, scales).numpy()
    got = ops.mxfp4_dequant(codes, scales, dtype)
    assert got.dtype == dtype and torch.equal(got.float(), torch.from_numpy(ref))
    # strided rows (the experts' layout: codes then exponents on one row)
    packed = torch.cat([codes, scales], dim=1)
    assert torch.equal(ops.mxfp4_dequant(packed[:, :128], packed[:, 128:], dtype), got)


@pytest.mark.parametrize("rows", [1, 7, 200])
def test_compiled_gemv_equals_the_dequantized_reference(rows):
    ops = _ops()
    raw, ref_w = _blocks(seed=3)
    codes, scales = mx.decode_blocks(raw, 48, 256)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(4))
    ref = F.linear(x.double(), torch.from_numpy(ref_w).double()).float()
    assert _rel(ops.mxfp4_linear(x, codes, scales), ref) < 1e-5
    packed = torch.cat([codes, scales], dim=1)
    assert torch.equal(ops.mxfp4_linear(x, packed[:, :128], packed[:, 128:]), ops.mxfp4_linear(x, codes, scales))


@pytest.mark.parametrize("fallback", [False, True], ids=["kernels", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 200])  # 200: dequantize + the dtype's GEMM
def test_matmul_equals_the_dequantized_reference(fallback, dtype, rows):
    raw, ref_w = _blocks(seed=5)
    codes, scales = mx.decode_blocks(raw, 48, 256)
    kernel = None if fallback else _ops()
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(6)).to(dtype)
    ref = F.linear(x.double(), torch.from_numpy(ref_w).double()).float()
    y = mx.mxfp4_linear(x, codes, scales, kernel)
    assert y.dtype == dtype and y.shape == (rows, 48)
    assert _rel(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_dense_linear_method():
    from fleetlm.layers.linear import RowParallelLinear

    raw, ref_w = _blocks(seed=7)
    layer = RowParallelLinear(256, 48, dtype=torch.float32, linear_method=mx.MXFP4LinearMethod())
    codes, scales = mx.decode_blocks(raw, 48, 256)
    layer.weight_loader(layer.qweight, codes)
    layer.weight_loader(layer.scales, scales)
    layer.process_weights_after_loading()
    assert torch.equal(layer.linear_method.dequantized(layer), torch.from_numpy(ref_w))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(8))
    assert _rel(layer(x), F.linear(x.double(), torch.from_numpy(ref_w).double()).float()) < 1e-5


# -- the MoE layer ---------------------------------------------------------------------------------
E, K, H, INTER = 8, 2, 64, 64


def _expert_blocks(seed: int = 0, inter: int = INTER) -> tuple[dict, dict]:
    """Per expert: the raw MXFP4 blocks of gate / up / down and their dequantized weights."""
    rng = np.random.default_rng(seed)
    raw, w = {}, {}
    for e in range(E):
        raw[e], w[e] = {}, {}
        for kind, shape in (("gate", (inter, H)), ("up", (inter, H)), ("down", (H, inter))):
            b = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32) * 0.3, MXFP4)
            raw[e][kind] = torch.from_numpy(b)
            w[e][kind] = torch.from_numpy(gguf.quants.dequantize(b, MXFP4).reshape(shape))
    return raw, w


def _mx_layer(moe, raw: dict, dtype: torch.dtype = torch.float32):
    from fleetlm.layers.moe import FusedMoE

    layer = FusedMoE(moe, H, dtype, method=mx.MXFP4MoEMethod())
    for e, parts in raw.items():
        for kind, t in parts.items():
            layer.weight_loader(layer.w2_weight if kind == "down" else layer.w13_weight, t, (e, kind))
    return layer


@pytest.mark.parametrize("fallback", [False, True], ids=["kernels", "torch"])
@pytest.mark.parametrize("tokens", [1, 7, 200])
def test_moe_layer_equals_the_per_token_reference(monkeypatch, fallback, tokens):
    from fleetlm.moe.config import MoEConfig

    if fallback:
        monkeypatch.setattr(mx, "_kernel", lambda codes: None)
    raw, w = _expert_blocks()
    layer = _mx_layer(MoEConfig(E, K, INTER), raw)
    assert layer.w13_weight.dtype == torch.uint8 and layer.w13_weight.shape == (E, 2 * INTER, H // 2 + H // 32)
    g = torch.Generator().manual_seed(9)
    x, logits = torch.randn(tokens, H, generator=g), torch.randn(tokens, E, generator=g)
    torch.testing.assert_close(layer(x, logits), _reference(x, logits, w, K, True), rtol=1e-4, atol=1e-4)
    bf16 = _mx_layer(MoEConfig(E, K, INTER), raw, torch.bfloat16)
    ref = _reference(x, logits, w, K, True)
    assert _rel(bf16(x.bfloat16(), logits), ref) < 3e-2


def test_moe_layer_passes_the_input_gradient():
    """The codes are frozen; an input whose gradient is wanted takes the differentiable path."""
    from fleetlm.moe.config import MoEConfig

    raw, w = _expert_blocks(seed=13)
    layer = _mx_layer(MoEConfig(E, K, INTER), raw)
    g = torch.Generator().manual_seed(14)
    x, logits = torch.randn(5, H, generator=g), torch.randn(5, E, generator=g)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    layer(xa, logits).pow(2).sum().backward()
    _reference(xb, logits, w, K, True).pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)


# -- bad input ----------------------------------------------------------------------------------------
def test_sizes_that_are_not_whole_blocks_are_refused():
    from fleetlm.layers.linear import ColumnParallelLinear, RowParallelLinear
    from fleetlm.layers.moe import FusedMoE
    from fleetlm.moe.config import MoEConfig

    raw, _ = _blocks(rows=4, cols=64)
    with pytest.raises(ValueError, match="MXFP4 needs the row length to be a multiple of its 32-weight block, got 48"):
        mx.decode_blocks(raw, 4, 48)
    with pytest.raises(ValueError, match=r"MXFP4 blocks for \[4, 96\] are 204 uint8 bytes"):
        mx.decode_blocks(raw, 4, 96)
    with pytest.raises(ValueError, match="hidden size .* multiple of its 32-weight block, got 48"):
        FusedMoE(MoEConfig(E, K, 64), 48, torch.float32, method=mx.MXFP4MoEMethod())
    with pytest.raises(ValueError, match=r"expert width per rank \(48 / tensor parallel 1 = 48\) is not a multiple"):
        FusedMoE(MoEConfig(E, K, 48), 64, torch.float32, method=mx.MXFP4MoEMethod())
    with pytest.raises(ValueError, match="input size of RowParallelLinear to be a multiple .* got 80"):
        RowParallelLinear(80, 16, dtype=torch.float32, linear_method=mx.MXFP4LinearMethod())
    codes, scales = mx.decode_blocks(raw, 4, 64)
    with pytest.raises(ValueError, match="the input has 48 features, the weight 64"):
        mx.mxfp4_linear(torch.zeros(2, 48), codes, scales)
    layer = _mx_layer(MoEConfig(E, K, INTER), {})
    with pytest.raises(ValueError, match=r"MXFP4 expert gate weight: expected the GGUF blocks of a \[64, 64\] "
                                         r"matrix \(uint8 \[64, 34\]\), got torch.float32 \[64, 64\]"):
        layer.weight_loader(layer.w13_weight, torch.zeros(INTER, H), (0, "gate"))
    layer = ColumnParallelLinear(64, 4, dtype=torch.float32, linear_method=mx.MXFP4LinearMethod())
    assert layer.qweight.shape == (4, 32) and layer.scales.shape == (4, 2)


# -- GGUF files with MXFP4 experts ------------------------------------------------------------------
@pytest.fixture(scope="module")
def mxfp4_gguf(tmp_path_factory):
    """``family`` -> a tiny MoE GGUF whose stacked expert tensors ``write_moe_gguf`` wrote as MXFP4
    (as ``llama-quantize --type MXFP4_MOE`` leaves them), beside Q8_0 ``attn_output`` and dense MLP
    (Qwen2-MoE's layer 1) tensors that the GGUF config keeps and a Q8_0 output matrix and
    embedding (as llama-quantize leaves them); everything else stays F32."""
    real, files = gguf.GGUFWriter.add_tensor, {}

    def add_tensor(self, name, tensor, *args, **kwargs):
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        dense = kind in ("attn_output", "ffn_gate", "ffn_up", "ffn_down") or name in ("output.weight", "token_embd.weight")
        qtype = MXFP4 if name.endswith("_exps.weight") else gguf.GGMLQuantizationType.Q8_0 if dense else None
        if qtype is not None:
            return real(self, name, gguf.quants.quantize(np.asarray(tensor, np.float32), qtype), raw_dtype=qtype)
        return real(self, name, tensor, *args, **kwargs)

    def make(family: str) -> str:
        if family not in files:
            out = tmp_path_factory.mktemp(family)
            hf = make_tiny_moe_dir(out / "hf", family)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(gguf.GGUFWriter, "add_tensor", add_tensor)
                files[family] = str(write_moe_gguf(hf, out / "m.gguf", family))
        return files[family]

    return make


def _greedy(path: str, quantization: str):
    from fleetlm import LLM, SamplingParams

    with LLM(path, dtype="float32", quantization=quantization, kv_cache_memory=8 << 20) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
        model = llm.engine.core.executor.worker.runner.model
        return [o.outputs[0].token_ids for o in outs], model.moe_layers(), model


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_gguf_mxfp4_experts_stay_quantized_and_match_dequantized(mxfp4_gguf, family):
    from fleetlm.layers.moe import UnquantizedMoEMethod

    path = mxfp4_gguf(family)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "MXFP4" and types["blk.0.attn_q.weight"] == "F32"
    assert types["blk.0.attn_output.weight"] == "Q8_0"
    want, ref_layers, _ = _greedy(path, "dequantize")
    got, layers, model = _greedy(path, "gguf")
    assert got == want
    # the GGUF config's dense decisions stand beside the experts (Q8_0: group-wise int8)
    assert type(model.model.layers[0].self_attn.o_proj.linear_method).__name__ == "Int8GroupLinearMethod"
    assert type(model.lm_head).__name__ == "Int8GroupLMHead"  # the Q8_0 output matrix as shipped
    if family == "qwen2_moe":  # its dense layer 1
        assert type(model.model.layers[1].mlp.down_proj.linear_method).__name__ == "Int8GroupLinearMethod"
    assert layers and all(isinstance(m.method, UnquantizedMoEMethod) for m in ref_layers.values())
    for i, m in layers.items():
        assert isinstance(m.method, mx.MXFP4MoEMethod), i
        h, inter = m.hidden_size, m.intermediate_size
        assert m.w13_weight.dtype == m.w2_weight.dtype == torch.uint8
        # 17 bytes per 32 weights: 4.25 bits a weight
        assert m.w13_weight.nbytes + m.w2_weight.nbytes == m.num_experts * 3 * h * inter * 17 // 32
        w13, w2 = m.method.dequantized(m, 0)
        torch.testing.assert_close(w13, ref_layers[i].w13_weight.data[0], rtol=0, atol=0)
        torch.testing.assert_close(w2, ref_layers[i].w2_weight.data[0], rtol=0, atol=0)


def test_gguf_mxfp4_config_by_dtype_and_quantization(mxfp4_gguf, monkeypatch):
    """Kept for bf16 by default and for fp32 with ``gguf``; ``dequantize`` (and fp32 by default)
    dequantizes the experts."""
    from pathlib import Path

    from fleetlm.models.loader import load_model_files

    monkeypatch.setattr("fleetlm.models.loader.tokenizer_from_gguf_fields", lambda fields: None)  # not needed here
    path = Path(mxfp4_gguf("mixtral"))
    prefix = "model.layers.0.block_sparse_moe.experts"
    for dtype, quant, kept in ((torch.bfloat16, None, True), (torch.float32, "gguf", True),
                               (torch.bfloat16, "dequantize", False), (torch.float32, None, False)):
        files = load_model_files(path, dtype, quant)
        q = files.config.quantization
        method = None if q is None else q.moe_method(prefix)
        assert isinstance(method, mx.MXFP4MoEMethod) == kept, (dtype, quant)
        name, t = next((n, t) for n, t in files.weights if ".experts.0.w1." in n)
        assert (t.dtype == torch.uint8) == kept and t.shape == ((96, 64 // 32 * 17) if kept else (96, 64))


# -- 2 ranks -------------------------------------------------------------------------------------
def _run(rank: int, port: int) -> None:
    from fleetlm.distributed.communication import tensor_model_parallel_all_reduce
    from fleetlm.distributed.parallel_state import (
        ParallelConfig,
        destroy_distributed,
        init_distributed,
    )
    from fleetlm.layers.moe import FusedMoE
    from fleetlm.moe.config import MoEConfig

    torch.set_num_threads(1)
    init_distributed(ParallelConfig(2, 1), rank, torch.device("cpu"), init_method=f"tcp://127.0.0.1:{port}")
    try:
        raw, w = _expert_blocks(seed=11)
        g = torch.Generator().manual_seed(12)
        x, logits = torch.randn(13, H, generator=g), torch.randn(13, E, generator=g)
        logits[:, 1] += 4.0  # expert 1 (rank 0) is hot: a replica is placed on rank 1
        expected = _reference(x, logits, w, K, True)
        layouts = [dict(expert_parallel=False), dict(expert_parallel=True, ep_dispatch="all_to_all"),
                   dict(expert_parallel=True, ep_dispatch="all_reduce"),
                   dict(expert_parallel=True, replica_slots=1, rebalance_interval=1)]
        for kw in layouts:
            layer = _mx_layer(MoEConfig(E, K, INTER, **kw), raw)
            if not kw["expert_parallel"]:  # this rank's 32 columns of each gate / up / down
                assert layer.w13_weight.shape == (E, INTER, H // 2 + H // 32)
                assert layer.w2_weight.shape == (E, H, INTER // 4 + INTER // 64)
            with torch.no_grad():
                for _ in range(2 if kw.get("replica_slots") else 1):
                    out = layer(x, logits)
                    if layer.output_is_partial:
                        out = tensor_model_parallel_all_reduce(out)
                    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=str(kw))
            if kw.get("replica_slots"):
                assert layer.replication.placement.replicated() == (1,)
        with pytest.raises(ValueError, match=r"expert width per rank \(96 / tensor parallel 2 = 48\) is not a "
                                             "multiple of the 32-weight block"):
            FusedMoE(MoEConfig(E, K, 96), H, torch.float32, method=mx.MXFP4MoEMethod())
        FusedMoE(MoEConfig(E, K, 96, expert_parallel=True), H, torch.float32, method=mx.MXFP4MoEMethod())
    finally:
        destroy_distributed()


def test_tp_ep_and_replica_layouts_match_one_process():
    torch.multiprocessing.spawn(_run, args=(_port(),), nprocs=2, join=True)
