"""GGUF Q4_K and Q6_K kept quantized: Q4_K's 32-weight sub-blocks as int4 groups of 32 (scale
``d sc``, zero ``8 d sc - dmin m``), Q6_K's 16-weight sub-blocks as int8 groups of 16 (codes
``q - 32``, scale ``d sc``).

Tolerances: Q6_K decodes bit-exactly to the gguf library's dequantization (fp16 ``d`` times an int8
scale, times a 6-bit code, is exact in fp32, and both compute it in the same order). Q4_K in our
int4 convention ``(q - 8) scale + zero`` rounds twice in fp32 (the zero, then the sum) where the
library's ``q scale - dmin m`` rounds once, so it is held within ``2^-22 (|zero| + |w|)`` per weight
(measured: at most 1 ulp off, on 17% of random blocks). Matmuls as in test_quant_gguf.py: fp32
activations within 1e-4 of the output scale, bf16 within 2e-2. A tiny Llama GGUF whose layers are
Q4_K / Q6_K gives the same fp32 greedy tokens kept quantized as dequantized at load."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from fleetlm import LLM, SamplingParams
from fleetlm.layers.linear import RowParallelLinear
from fleetlm.quantization.gguf import GGUFQuantConfig, decode_blocks, plan_kept
from fleetlm.quantization.int4 import Int4LinearMethod, dequantize_int4
from fleetlm.quantization.int8_group import Int8GroupLinearMethod, dequantize_int8_groups
from fleetlm.quantization.lm_head import Int8Group16LMHead
from tests.helpers import make_tiny_hf_dir
from tests.moe_helpers import permute_qk, write_gguf_header

QK = 256
_SIZE = {"Q4_K": 144, "Q6_K": 210}
_F16_AT = {"Q4_K": (0, 2), "Q6_K": (208,)}  # byte offsets of the fp16 d (and dmin)


# ---- test-side encoders (the gguf package dequantizes K-quants but cannot quantize them) ------

def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)


def encode_q6_k(w: np.ndarray) -> np.ndarray:
    """[rows, cols] fp32 -> Q6_K bytes [rows, cols / 256 * 210] (a plain absmax quantizer)."""
    rows, cols = w.shape
    x = w.reshape(rows, cols // QK, 16, 16).astype(np.float32)
    sub = np.abs(x).max(-1) / 31.0  # [rows, nb, 16]
    d = (sub.max(-1) / 127.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(sub / np.where(d > 0, d, 1)[..., None]), -128, 127).astype(np.int8)
    step = d[..., None] * sc
    q = np.clip(np.round(x / np.where(step > 0, step, 1)[..., None]) + 32, 0, 63).astype(np.uint8)
    q = q.reshape(rows, -1, 2, 4, 32)  # half, i, l: weight 32 i + l of the half
    ql = (q[:, :, :, 0:2] & 15) | ((q[:, :, :, 2:4] & 15) << 4)  # [rows, nb, half, chunk, 32]
    qh = sum(((q[:, :, :, i] >> 4) & 3) << (2 * i) for i in range(4)).astype(np.uint8)  # [rows, nb, half, 32]
    nb = cols // QK
    raw = np.concatenate([ql.reshape(rows, nb, 128), qh.reshape(rows, nb, 64), sc.view(np.uint8),
                          _f16_bytes(d).reshape(rows, nb, 2)], axis=-1)
    return raw.reshape(rows, -1)


def encode_q4_k(w: np.ndarray) -> np.ndarray:
    """[rows, cols] fp32 -> Q4_K bytes [rows, cols / 256 * 144] (min/max per sub-block of 32)."""
    rows, cols = w.shape
    nb = cols // QK
    x = w.reshape(rows, nb, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(-1), 0)
    scale, mins = (x.max(-1) - lo) / 15.0, -lo
    d = (scale.max(-1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = (mins.max(-1) / 63.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)[..., None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(mins / np.where(dmin > 0, dmin, 1)[..., None]), 0, 63).astype(np.uint8)
    step = d[..., None] * sc
    q = np.round((x + (dmin[..., None] * mn)[..., None]) / np.where(step > 0, step, 1)[..., None])
    return pack_q4_k(d, dmin, sc, mn, np.clip(q, 0, 15).astype(np.uint8))


def pack_q4_k(d, dmin, sc, mn, q) -> np.ndarray:
    """d, dmin [rows, nb]; sub-block scales and mins [rows, nb, 8] (0..63); codes [rows, nb, 8, 32]."""
    rows, nb = d.shape
    q = q.reshape(rows, nb, 4, 2, 32)  # chunk, low/high nibble, l
    packed = np.concatenate([(sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
                             (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6),
                             (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)], axis=-1)
    nibbles = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(rows, nb, 128)
    raw = np.concatenate([_f16_bytes(d).reshape(rows, nb, 2), _f16_bytes(dmin).reshape(rows, nb, 2),
                          packed, nibbles], axis=-1)
    return raw.reshape(rows, -1)


ENCODE = {"Q4_K": encode_q4_k, "Q6_K": encode_q6_k, "Q8_0": lambda w: gguf.quants.quantize(w, T.Q8_0),
          "MXFP4": lambda w: gguf.quants.quantize(w, T.MXFP4)}


def _random_blocks(kind: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes, with random finite fp16 values (subnormals included) where d / dmin sit."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // QK, _SIZE[kind]), dtype=np.uint8)
    for at in _F16_AT[kind]:
        bits = rng.integers(0, 1 << 16, raw.shape[:2], dtype=np.uint16)
        bits = np.where(bits & 0x7C00 == 0x7C00, bits & 0xBFFF, bits).astype(np.uint16)  # no inf / nan
        raw[..., at : at + 2] = bits[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def _ours(kind: str, raw: np.ndarray, rows: int, cols: int) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in decode_blocks(raw, kind, rows, cols).items()}


# ---- decoding -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_q6_k_decodes_exactly_to_the_gguf_dequantization(seed):
    raw = _random_blocks("Q6_K", 12, 512, seed)
    ref = gguf.quants.dequantize(raw, T.Q6_K).reshape(12, 512)
    parts = _ours("Q6_K", raw, 12, 512)
    assert parts["qweight"].dtype == torch.int8 and parts["scales"].shape == (12, 512 // 16)
    assert -32 <= int(parts["qweight"].min()) and int(parts["qweight"].max()) <= 31
    got = dequantize_int8_groups(parts["qweight"], parts["scales"]).numpy()
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_q4_k_decodes_to_the_gguf_dequantization(seed):
    raw = _random_blocks("Q4_K", 12, 512, seed)
    ref = gguf.quants.dequantize(raw, T.Q4_K).reshape(12, 512)
    parts = _ours("Q4_K", raw, 12, 512)
    assert parts["qweight"].dtype == torch.uint8 and int(parts["qweight"].max()) <= 15
    assert parts["scales"].shape == parts["zeros"].shape == (12, 512 // 32)
    got = dequantize_int4(parts["qweight"], parts["scales"], parts["zeros"]).numpy()
    zero = np.repeat(parts["zeros"].numpy(), 32, axis=1)
    assert np.isfinite(ref).all()
    assert (np.abs(got - ref) <= 2.0**-22 * (np.abs(zero) + np.abs(ref))).all()


def test_q4_k_scale_and_min_packing():
    """Hand-made block: sub-block scales and mins that use all 6 bits in all 8 positions, codes a
    ramp: ``w = sc_j q - m_j`` exactly (d = dmin = 1), by gguf and by us; weights 0..31 of each
    64 are the low nibbles."""
    sc = np.array([[[63, 1, 17, 48, 33, 62, 5, 40]]], np.uint8)
    mn = np.array([[[2, 63, 49, 16, 61, 34, 47, 9]]], np.uint8)
    q = np.tile(np.arange(32, dtype=np.uint8) % 16, (1, 1, 8, 1))
    q[0, 0, 1] = 15 - q[0, 0, 1]  # the high nibbles of chunk 0 differ from its low ones
    one = np.ones((1, 1), np.float32)
    raw = pack_q4_k(one, one, sc, mn, q)
    want = (sc[..., None].astype(np.float32) * q - mn[..., None]).reshape(1, QK)
    np.testing.assert_array_equal(gguf.quants.dequantize(raw, T.Q4_K).reshape(1, QK), want)
    parts = decode_blocks(raw, "Q4_K", 1, QK)
    np.testing.assert_array_equal(parts["qweight"], q.reshape(1, QK))
    np.testing.assert_array_equal(parts["scales"], sc.reshape(1, 8).astype(np.float32))
    got = dequantize_int4(*(torch.from_numpy(parts[k]) for k in ("qweight", "scales", "zeros"))).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_encoders_round_trip(kind):
    w = np.random.default_rng(3).standard_normal((16, 512)).astype(np.float32)
    ref = gguf.quants.dequantize(ENCODE[kind](w), T[kind]).reshape(w.shape)
    assert np.abs(ref - w).max() < (0.35 if kind == "Q4_K" else 0.1)


# ---- the layer's matmul ---------------------------------------------------------------------

def _kept_layer(kind: str, dtype: torch.dtype, raw: np.ndarray, rows: int, cols: int):
    method = GGUFQuantConfig({"x": kind}).linear_method("x")
    layer = RowParallelLinear(cols, rows, dtype=dtype, linear_method=method)
    for name, value in decode_blocks(raw, kind, rows, cols).items():
        layer.weight_loader(getattr(layer, name), torch.from_numpy(value))
    layer.process_weights_after_loading()
    return layer


def test_types_route_to_their_method_and_group():
    cfg = GGUFQuantConfig({"a": "Q4_K", "b": "Q6_K", "c": "Q8_0", "d": "Q4_1"})
    a, b, c, d = (cfg.linear_method(p) for p in "abcd")
    assert isinstance(a, Int4LinearMethod) and a.prequantized and a.group_size == 32
    assert isinstance(b, Int8GroupLinearMethod) and b.group_size == 16
    assert isinstance(c, Int8GroupLinearMethod) and c.group_size == 32
    assert isinstance(d, Int4LinearMethod) and d.group_size == 32
    assert cfg.linear_method("e") is None


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 80])  # 80 rows: both methods' GEMM paths
def test_kept_matmul_equals_dequantized_reference(kind, dtype, rows):
    w = np.random.default_rng(1).standard_normal((48, 512)).astype(np.float32)
    raw = ENCODE[kind](w)
    ref_w = torch.from_numpy(gguf.quants.dequantize(raw, T[kind]).reshape(48, 512).copy())
    layer = _kept_layer(kind, dtype, raw, 48, 512)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = F.linear(x.float(), ref_w)
    err = (layer(x).float() - ref).abs().max() / ref.abs().max()
    assert err < (1e-4 if dtype == torch.float32 else 2e-2), f"{err:.2e}"


# ---- a tiny Llama GGUF with K-quant layers --------------------------------------------------

_KIND = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# per layer: alternate the two types so both are kept in merged and plain layers
_LAYOUT = {0: {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q4_K", "attn_output": "Q6_K",
               "ffn_gate": "Q6_K", "ffn_up": "Q6_K", "ffn_down": "Q4_K"},
           1: {"attn_q": "Q6_K", "attn_k": "Q6_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
               "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}}
_MIXED = {**_LAYOUT, 0: {**_LAYOUT[0], "attn_v": "Q6_K"}}  # Q4_K_M style: q, k Q4_K and v Q6_K
PROMPTS = [[7, 300, 4000, 12, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [4242] * 6]


def write_llama_gguf(hf_dir, out, layout: dict, embd: str = "Q4_K", head: str = "Q6_K"):
    """The tiny HF Llama as a GGUF the way llama.cpp's converter lays it out (q/k rows permuted),
    its matrices quantized per ``layout`` (layer -> kind -> type), norms in F32."""
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), "llama")
    write_gguf_header(w, cfg)

    def add(name: str, a: np.ndarray, kind: str) -> None:
        if kind == "F32":
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, ENCODE[kind](a), raw_dtype=T[kind])

    state = {k: v.float().numpy() for k, v in load_file(str(next(hf_dir.glob("*.safetensors")))).items()}
    for name, a in state.items():
        if name == "model.embed_tokens.weight":
            add("token_embd.weight", a, embd)
        elif name == "model.norm.weight":
            add("output_norm.weight", a, "F32")
        elif name == "lm_head.weight":
            add("output.weight", a, head)
        else:
            m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight", name)
            kind = _KIND[m[2]]
            if kind in ("attn_q", "attn_k"):
                a = permute_qk(a, heads if kind == "attn_q" else kv)
            add(f"blk.{m[1]}.{kind}.weight", a, layout[int(m[1])].get(kind, "F32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny Llamas whose input sizes are multiples of 256 (a K-quant super-block): untied, tied."""
    base = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    return {"untied": make_tiny_hf_dir(tmp_path_factory.mktemp("untied"), **base),
            "tied": make_tiny_hf_dir(tmp_path_factory.mktemp("tied"), seed=1, tie_word_embeddings=True, **base)}


def _greedy(path, quantization: str):
    with LLM(str(path), dtype="float32", quantization=quantization, kv_cache_memory=8 << 20) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
        model = llm.engine.core.executor.worker.runner.model
        layers = [{"qkv": lay.self_attn.qkv_proj, "o": lay.self_attn.o_proj, "gate_up": lay.mlp.gate_up_proj,
                   "down": lay.mlp.down_proj} for lay in model.model.layers]
        methods = [{k: (type(m.linear_method).__name__, getattr(m.linear_method, "group_size", None),
                        _codes_dtype(m)) for k, m in lay.items()} for lay in layers]
        return [o.outputs[0].token_ids for o in outs], model.config.quantization, methods, model.lm_head


def _codes_dtype(layer) -> str | None:
    if hasattr(layer, "nibbles"):  # int4 on the CPU: two codes a byte
        assert layer.nibbles.dtype == torch.uint8 and (hasattr(layer, "packed") or hasattr(layer, "q8_kernel"))
        return "int4"
    if hasattr(layer, "qweight"):
        return str(layer.qweight.dtype).removeprefix("torch.")
    return None


_INT4 = ("Int4LinearMethod", 32, "int4")
_INT8_16 = ("Int8GroupLinearMethod", 16, "int8")


def test_k_quant_llama_kept_equals_dequantized(hf_dirs, tmp_path):
    path = write_llama_gguf(hf_dirs["untied"], tmp_path / "k.gguf", _LAYOUT)
    want, plain_cfg, plain, _ = _greedy(path, "dequantize")
    assert plain_cfg is None and all(m[0] == "UnquantizedLinearMethod" for lay in plain for m in lay.values())
    got, cfg, methods, head = _greedy(path, "gguf")
    assert len({t for seq in want for t in seq}) > 6  # not a degenerate repetition
    assert got == want
    assert methods[0] == {"qkv": _INT4, "o": _INT8_16, "gate_up": _INT8_16, "down": _INT4}
    assert methods[1] == {"qkv": _INT8_16, "o": _INT4, "gate_up": _INT4, "down": _INT8_16}
    assert cfg.describe() == "gguf (Q4_K, Q6_K kept quantized in 8 layers)"
    assert cfg.lm_head() == "int8_group16" and isinstance(head, Int8Group16LMHead)
    assert head.qweight.dtype == torch.int8 and head.scales.shape == (49152, 256 // 16)


def test_mixed_merged_layer_is_dequantized_and_still_matches(hf_dirs, tmp_path, caplog):
    path = write_llama_gguf(hf_dirs["untied"], tmp_path / "mixed.gguf", _MIXED)
    want, *_ = _greedy(path, "dequantize")
    with caplog.at_level("INFO", logger="fleetlm"):
        got, cfg, methods, _ = _greedy(path, "gguf")
    assert got == want
    assert methods[0]["qkv"] == ("UnquantizedLinearMethod", None, None)
    assert methods[0]["o"] == _INT8_16 and methods[1]["qkv"] == _INT8_16
    assert cfg.dequantized == ("model.layers.0.self_attn.qkv_proj",)
    assert cfg.describe() == "gguf (Q4_K, Q6_K kept quantized in 7 layers; 1 dequantized)"
    assert "self_attn.qkv_proj (Q4_K + Q6_K) in layers 0" in caplog.text


def test_tied_q6_k_embedding_is_the_head_as_shipped(hf_dirs, tmp_path):
    path = write_llama_gguf(hf_dirs["tied"], tmp_path / "tied.gguf", _LAYOUT, embd="Q6_K")
    want, *_ = _greedy(path, "dequantize")
    got, cfg, _, head = _greedy(path, "gguf")
    assert got == want
    assert isinstance(head, Int8Group16LMHead) and head.tied and head.method.group_size == 16
    assert torch.equal(head.dense_twin(), head.method.dequantized(head).to(head.dense_twin().dtype))


def test_plan_kept_heads_and_mixed_types():
    class _T:  # the two attributes plan_kept reads from a GGUFReader tensor
        def __init__(self, name, kind):
            self.name, self.tensor_type = name, T[kind]

    files = [_T("blk.0.attn_q.weight", "Q4_K"), _T("blk.0.attn_k.weight", "Q4_K"), _T("blk.0.attn_v.weight", "Q6_K"),
             _T("blk.0.ffn_down.weight", "Q6_K"), _T("token_embd.weight", "Q4_K")]
    cfg = plan_kept([*files, _T("output.weight", "Q6_K")])
    assert cfg.kept == {"model.layers.0.mlp.down_proj": "Q6_K"}
    assert (cfg.head, cfg.head_group, cfg.lm_head()) == ("int8_group", 16, "int8_group16")
    assert plan_kept([*files, _T("output.weight", "Q8_0")]).lm_head() == "int8_group"
    assert plan_kept([*files, _T("output.weight", "Q4_K")]).lm_head() == "int8"
    assert plan_kept(files[:3] + [_T("output.weight", "F16")]) is None


def test_untied_q8_0_output_is_the_head_as_shipped(hf_dirs, tmp_path):
    """An untied Q8_0 ``output.weight`` (Llama-3 style Q8_0 files) loads as the group-32 head (its
    full-precision ``weight`` is no parameter the checkpoint must fill)."""
    path = write_llama_gguf(hf_dirs["untied"], tmp_path / "q8.gguf", _LAYOUT, head="Q8_0")
    want, *_ = _greedy(path, "dequantize")
    got, cfg, _, head = _greedy(path, "gguf")
    assert got == want
    assert cfg.lm_head() == "int8_group" and type(head).__name__ == "Int8GroupLMHead"
    assert head.method.group_size == 32 and head.weight.numel() == 0


@pytest.mark.parametrize("kind", ["Q6_K"])  # Q4_K holds the int4 layout Q4_1's e2e bytes test checks
def test_kept_bytes_equal_the_planners(hf_dirs, tmp_path, kind):
    """Every layer in one K-quant type, a Q6_K head: the bytes held equal the planner's."""
    from fleetlm.plan.quant_bytes import engine_weight_bytes
    from fleetlm.quantization.base import int8_activation_kernels
    from tests.unit.test_quant_bytes import dims, measured_weight_bytes

    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    path = write_llama_gguf(hf_dirs["untied"], tmp_path / f"{kind}.gguf", {i: dict.fromkeys(kinds, kind) for i in (0, 1)})
    with LLM(str(path), dtype="bfloat16", kv_cache_memory=8 << 20) as llm:
        model = llm.engine.core.executor.worker.runner.model
        assert measured_weight_bytes(model) == engine_weight_bytes(dims(hf_dirs["untied"]), kind, 2, head="int8_group16",
                                                                     int4_q8=int8_activation_kernels() is not None)


def test_dense_mxfp4_layers_are_kept(hf_dirs, tmp_path):
    """Dense MXFP4 matrices (beside K-quant ones) stay in MXFP4 and give the dequantized tokens."""
    layout = {0: {**_LAYOUT[0], "attn_q": "MXFP4", "attn_k": "MXFP4", "attn_v": "MXFP4", "ffn_down": "MXFP4"},
              1: _LAYOUT[1]}
    path = write_llama_gguf(hf_dirs["untied"], tmp_path / "mx.gguf", layout)
    want, *_ = _greedy(path, "dequantize")
    got, cfg, methods, _ = _greedy(path, "gguf")
    assert got == want
    assert methods[0]["qkv"][0] == methods[0]["down"][0] == "MXFP4LinearMethod"
    assert cfg.describe() == "gguf (MXFP4, Q4_K, Q6_K kept quantized in 8 layers)"


def test_kept_head_loads_on_pipeline_stages(hf_dirs, tmp_path):
    """A tied Q8_0 embedding kept as the head (as the default SmolLM2 GGUF ships): the first stage
    skips the head's codes, the last stage takes them instead of the float embedding; two stages
    give one process's tokens."""
    path = write_llama_gguf(hf_dirs["tied"], tmp_path / "pp.gguf", _LAYOUT, embd="Q8_0")
    want, cfg, _, head = _greedy(path, "gguf")
    assert cfg.lm_head() == "int8_group" and head.tied
    with LLM(str(path), dtype="float32", quantization="gguf", pipeline_parallel_size=2, kv_cache_memory=8 << 20) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
