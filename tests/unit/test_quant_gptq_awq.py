"""Hugging Face GPTQ and AWQ int4 checkpoints loaded into the int4 method (fleetlm/quantization/gptq.py).

The packers here are the test's own, written from the published layouts (AutoGPTQ / AutoAWQ):

- GPTQ ``qweight`` int32 [in / 8, out]: input ``8 i + j`` of column ``o`` in bits ``4 j`` of
  ``qweight[i, o]``; ``qzeros`` int32 [G, out / 8]: output ``8 c + j`` in bits ``4 j`` of
  ``qzeros[g, c]``, holding ``z - 1`` (checkpoint_format "gptq") or ``z`` ("gptq_v2");
  ``scales`` fp16 [G, out]; ``g_idx`` [in]; ``w = s[g_idx[k]] (q - z[g_idx[k]])``.
- AWQ GEMM ``qweight`` int32 [in, out / 8] and ``qzeros`` int32 [G, out / 8]: nibble ``i`` of
  column ``c`` holds output ``8 c + [0, 2, 4, 6, 1, 3, 5, 7][i]``; ``w = s (q - z)``.

Tolerances: the repack is exact (an fp16 scale times an integer in [-16, 16] is exact in fp32),
so dequantized weights are compared with ``torch.equal``. Whole models in fp32 compare greedy
tokens with the same model saved with the dequantized weights as a plain fp32 checkpoint; act
order only changes the order of the fp32 sums, so logits agree to 1e-4.
"""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fleetlm.layers.linear import QKVParallelLinear, RowParallelLinear
from fleetlm.quantization.act_order import ActOrderInt4LinearMethod
from fleetlm.quantization.gptq import (
    dequantize,
    load_prequantized,
    parse_quantization_config,
    repack,
)
from fleetlm.quantization.int4 import Int4LinearMethod

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# -- the test's own quantizer and packers -------------------------------------------------------------
def quantize(w: torch.Tensor, group: int, g_idx: torch.Tensor, zmin: int):
    """Per group (columns with the same g_idx): fp16 scales [G, out], integer zeros [G, out] in
    zmin..15, codes [out, in] in 0..15, and the reference weight s (q - z) in fp32."""
    out, k = w.shape
    n_groups = int(g_idx.max()) + 1
    s = torch.empty(n_groups, out, dtype=torch.float16)
    z = torch.empty(n_groups, out, dtype=torch.int64)
    for g in range(n_groups):
        cols = w[:, g_idx == g]
        lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        s[g] = ((hi - lo) / 15).clamp(min=1e-3).half()
        z[g] = torch.round(-lo / s[g].float()).clamp(zmin, 15).long()
    sc, zc = s.float()[g_idx].t(), z[g_idx].t()  # per column [out, in]
    q = torch.round(w / sc + zc).clamp(0, 15).long()
    return s, z, q, sc * (q - zc).float()


def _to_int32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint32).view(np.int32).copy())


def pack_gptq(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g_idx: torch.Tensor, fmt: str) -> dict:
    out, k = q.shape
    qt = q.t().numpy().astype(np.uint64)  # [in, out]
    qweight = np.zeros((k // 8, out), dtype=np.uint64)
    for j in range(8):
        qweight |= qt[j::8] << np.uint64(4 * j)
    zs = (z - 1 if fmt == "gptq" else z).numpy().astype(np.uint64)  # [G, out]
    qzeros = np.zeros((zs.shape[0], out // 8), dtype=np.uint64)
    for j in range(8):
        qzeros |= zs[:, j::8] << np.uint64(4 * j)
    return {"qweight": _to_int32(qweight), "qzeros": _to_int32(qzeros), "scales": s.clone(),
            "g_idx": g_idx.to(torch.int32)}


def pack_awq(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> dict:
    def pack(a: np.ndarray) -> torch.Tensor:  # [rows, out] -> [rows, out / 8]
        packed = np.zeros((a.shape[0], a.shape[1] // 8), dtype=np.uint64)
        for c in range(a.shape[1] // 8):
            for i, j in enumerate(AWQ_PACK_ORDER):
                packed[:, c] |= a[:, 8 * c + j] << np.uint64(4 * i)
        return _to_int32(packed)

    return {"qweight": pack(q.t().numpy().astype(np.uint64)), "qzeros": pack(z.numpy().astype(np.uint64)),
            "scales": s.clone()}


def g_idx_for(k: int, group: int, act_order: bool, seed: int = 0) -> torch.Tensor:
    """Without act order column k is in group k // group; with it, the columns are quantized in a
    random order and column perm[i] falls in group i // group (what GPTQ's desc_act writes)."""
    if group == -1:
        return torch.zeros(k, dtype=torch.int64)
    if not act_order:
        return torch.arange(k) // group
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[perm] = torch.arange(k) // group
    return g_idx


def checkpoint_tensors(method: str, w: torch.Tensor, group: int, act_order: bool = False, fmt: str = "gptq",
                       seed: int = 0, g_idx: torch.Tensor | None = None):
    """(checkpoint tensors of one layer, reference fp32 weight)."""
    g_idx = g_idx_for(w.shape[1], group, act_order, seed) if g_idx is None else g_idx
    s, z, q, ref = quantize(w, group, g_idx, zmin=1 if fmt == "gptq" else 0)
    if method == "awq":
        return pack_awq(q, z, s), ref
    return pack_gptq(q, z, s, g_idx, fmt), ref


def qconfig(method: str, group: int, act_order: bool = False, fmt: str = "gptq", **extra) -> dict:
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm", **extra}
    return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": False,
            "checkpoint_format": fmt, **extra}


def _repacked(cfg, tensors: dict, name: str = "L"):
    def get(suffix, optional=False):
        return tensors.get(suffix[1:]) if optional else tensors[suffix[1:]]

    return repack(cfg, name, get)


# -- unpack / repack round trip -------------------------------------------------------------------------
CASES = [("gptq", "gptq", False), ("gptq", "gptq", True), ("gptq", "gptq_v2", False), ("gptq", "gptq_v2", True),
         ("awq", "gemm", False)]


@pytest.mark.parametrize("method,fmt,act_order", CASES, ids=["gptq", "gptq-act", "gptq_v2", "gptq_v2-act", "awq"])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_repack_dequantizes_exactly_to_the_reference(method, fmt, act_order, group):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    tensors, ref = checkpoint_tensors(method, w, group, act_order, fmt)
    cfg = parse_quantization_config(qconfig(method, group, act_order, fmt))
    ours = _repacked(cfg, tensors)
    assert ours["qweight"].dtype == torch.uint8 and ours["qweight"].shape == (48, 256)
    assert int(ours["qweight"].max()) <= 15
    assert ("g_idx" in ours) == (act_order and group != -1)
    assert torch.equal(dequantize(ours["qweight"], ours["scales"], ours["zeros"], ours.get("g_idx")), ref)


def test_classic_gptq_zero_is_stored_minus_one():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    v1, _ = checkpoint_tensors("gptq", w, 32, fmt="gptq")
    v2, _ = checkpoint_tensors("gptq", w, 32, fmt="gptq_v2")
    assert torch.equal(v1["qweight"], v2["qweight"]) and not torch.equal(v1["qzeros"], v2["qzeros"])
    a = _repacked(parse_quantization_config(qconfig("gptq", 32, fmt="gptq")), v1)
    b = _repacked(parse_quantization_config(qconfig("gptq", 32, fmt="gptq_v2")), v2)
    assert torch.equal(a["zeros"], b["zeros"])
    # reading the classic file as v2 shifts every zero point by one scale
    c = _repacked(parse_quantization_config(qconfig("gptq", 32, fmt="gptq_v2")), v1)
    torch.testing.assert_close(c["zeros"], a["zeros"] + a["scales"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_order_layer_computes_with_the_checkpoint_weight(group, dtype):
    """Loaded through a real layer: columns permuted into group order, x gathered the same way."""
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    tensors, ref = checkpoint_tensors("gptq", w, group, act_order=True)
    ours = _repacked(parse_quantization_config(qconfig("gptq", group, True)), tensors)
    layer = RowParallelLinear(128, 48, dtype=dtype, linear_method=ActOrderInt4LinearMethod(group))
    for name, value in ours.items():
        layer.weight_loader(getattr(layer, name), value)
    layer.process_weights_after_loading()
    assert layer.in_perm is not None and not layer.in_pad  # TP = 1: a pure permutation
    if dtype == torch.float32:
        assert torch.equal(layer.linear_method.dequantized(layer), ref)
    for rows in (1, 70):  # the packed kernel (bf16) and the dequantize + GEMM path
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
        y = F.linear(x.float(), ref)
        err = (layer(x).float() - y).abs().max() / y.abs().max()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), f"{err:.2e}"


def test_merged_act_order_parts_must_share_g_idx():
    cfg = parse_quantization_config(qconfig("gptq", 32, True))
    layer = QKVParallelLinear(64, 16, 4, 2, dtype=torch.float32, linear_method=ActOrderInt4LinearMethod(32))
    w = torch.randn(64, 64)
    q, _ = checkpoint_tensors("gptq", w, 32, True, seed=1)
    k, _ = checkpoint_tensors("gptq", w[:32], 32, True, seed=2)
    layer.weight_loader(layer.g_idx, _repacked(cfg, q)["g_idx"], "q")
    with pytest.raises(ValueError, match="g_idx of shard k differs"):
        layer.weight_loader(layer.g_idx, _repacked(cfg, k)["g_idx"], "k")


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, r"quantization_config.bits 8 .* accepted: 4"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 100}, r"group_size 100 .* accepted: 32, 64, 128, -1"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     r"checkpoint_format 'marlin' .* accepted: 'gptq', 'gptq_v2'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "is_marlin_format": True}, "is_marlin_format"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"-:.*down": {}}}, "dynamic"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, r"version 'gemv' .* accepted: 'gemm'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "GEMV_FAST"}, r"version 'gemv_fast'"),
    ({"quant_method": "awq", "w_bit": 4, "q_group_size": 128, "zero_point": False}, "zero_point"),
    ({"quant_method": "bitsandbytes"}, r"quant_method 'bitsandbytes' .* accepted: 'gptq', 'awq'"),
])
def test_bad_quantization_config_names_the_field(qc, match):
    with pytest.raises(ValueError, match=match):
        parse_quantization_config(qc)


def test_group_size_not_dividing_the_layer_is_refused():
    w = torch.randn(16, 96)
    tensors, _ = checkpoint_tensors("gptq", w, 32)  # 3 groups of 32 ...
    with pytest.raises(ValueError, match="group_size 64 does not divide the layer's 96 input features"):
        _repacked(parse_quantization_config(qconfig("gptq", 64)), tensors, "L")  # ... read as groups of 64


def test_nontrivial_g_idx_without_desc_act_is_refused():
    tensors, _ = checkpoint_tensors("gptq", torch.randn(16, 64), 32, act_order=True)
    with pytest.raises(ValueError, match="desc_act"):
        _repacked(parse_quantization_config(qconfig("gptq", 32, act_order=False)), tensors)


def test_moe_checkpoint_is_refused():
    class Cfg:
        moe = object()

    with pytest.raises(ValueError, match="mixture-of-experts"):
        load_prequantized(qconfig("gptq", 128), Cfg(), [], torch.float32, None)


# -- whole models --------------------------------------------------------------------------------------------
PROMPTS = [[5, 17, 300, 42], list(range(100, 137)), [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12]]


def _quantize_dir(src, dst_q, dst_ref, method: str, group: int, act_order: bool = False, fmt: str = "gptq",
                  extra: dict | None = None, keep_fp: tuple[str, ...] = ()) -> None:
    """From a plain HF directory: a GPTQ / AWQ one (quantized linears, ``quantization_config``) and a
    reference one holding the same weights dequantized, as a plain fp32 checkpoint. Parts named in
    ``keep_fp`` stay plain weights in both."""
    sd = load_file(str(src / "model.safetensors"))
    quant, ref = {}, {}
    for name, t in sd.items():
        base = name[: -len(".weight")]
        part = ".".join(name.split(".")[3:5])
        if part not in LINEARS or any(k in base for k in keep_fp):
            quant[name] = ref[name] = t.float().contiguous()
            continue
        layer = int(name.split(".")[2])
        # parts that share an input share their act order (GPTQ's Hessian is the input's)
        seed = {"self_attn.o_proj": 2, "mlp.down_proj": 3}.get(part, 1 if part.startswith("self_attn") else 4)
        packed, w = checkpoint_tensors(method, t.float(), group, act_order, fmt, seed=seed + 10 * layer)
        quant.update({f"{base}.{k}": v.contiguous() for k, v in packed.items()})
        ref[name] = w.contiguous()
    for dst, tensors, qc in ((dst_q, quant, qconfig(method, group, act_order, fmt, **(extra or {}))),
                             (dst_ref, ref, None)):
        dst.mkdir()
        for f in src.iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, dst / f.name)
        save_file(tensors, str(dst / "model.safetensors"))
        cfg = json.loads((src / "config.json").read_text())
        cfg.pop("torch_dtype", None)
        cfg["dtype"] = "float32"
        if qc is not None:
            cfg["quantization_config"] = qc
        (dst / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    from tests.helpers import make_tiny_hf_dir

    return make_tiny_hf_dir(tmp_path_factory.mktemp("plain"), initializer_range=0.2)


MODELS = {
    "gptq-act-g32": dict(method="gptq", group=32, act_order=True, fmt="gptq"),
    "gptq_v2-g64": dict(method="gptq", group=64, fmt="gptq_v2"),
    "gptq-per-channel": dict(method="gptq", group=-1, act_order=True, fmt="gptq"),
    # layer 1's down_proj unquantized, layer 2's k_proj too: its q/v parts are dequantized at load
    "awq-g32-partial": dict(method="awq", group=32, keep_fp=("layers.1.mlp.down_proj", "layers.2.self_attn.k_proj"),
                            extra={"modules_to_not_convert": ["layers.1.mlp.down_proj", "layers.2.self_attn.k_proj"]}),
}


def _runner_model(llm):
    return llm.engine.core.executor.worker.runner.model


def _greedy(llm):
    from fleetlm import SamplingParams

    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)


@pytest.mark.parametrize("variant", list(MODELS))
def test_prequantized_model_matches_its_dequantized_fp32_checkpoint(tiny_src, tmp_path, variant):
    from fleetlm import LLM

    kw = dict(MODELS[variant])
    _quantize_dir(tiny_src, tmp_path / "q", tmp_path / "ref", **kw)
    with LLM(str(tmp_path / "ref"), dtype="float32", kv_cache_memory=16 << 20) as llm:
        ref = _greedy(llm)
        ref_model = _runner_model(llm)
        ref_w = {n: p.detach().clone() for n, p in ref_model.named_parameters() if n.endswith("proj.weight")}
    with LLM(str(tmp_path / "q"), dtype="float32", kv_cache_memory=16 << 20) as llm:
        got = _greedy(llm)
        model = _runner_model(llm)
        assert model.config.quantization.name == kw["method"]
        int4 = 0
        for name, mod in model.named_modules():
            if not name.endswith("_proj"):
                continue
            if isinstance(mod.linear_method, Int4LinearMethod):
                int4 += 1
                assert not hasattr(mod, "weight") and mod.nibbles.dtype == torch.uint8  # int4 codes only
                assert torch.equal(mod.linear_method.dequantized(mod), ref_w[f"{name}.weight"]), name
            else:
                assert torch.equal(mod.weight, ref_w[f"{name}.weight"]), name
        assert int4 == (10 if "partial" in variant else 12)  # 3 layers x (qkv, o, gate_up, down)
        assert isinstance(model.model.layers[0].self_attn.qkv_proj.linear_method,
                          ActOrderInt4LinearMethod if kw.get("act_order") and kw["group"] != -1 else Int4LinearMethod)
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for t in la:
                assert abs(la[t].logprob - lb[t].logprob) < 1e-4


def test_quantization_names_on_prequantized_checkpoints(tiny_src, tmp_path):
    from fleetlm.models.loader import load_model_files

    _quantize_dir(tiny_src, tmp_path / "q", tmp_path / "ref", method="gptq", group=32)
    assert load_model_files(tmp_path / "q", torch.float32, "gptq").config.quantization.name == "gptq"
    with pytest.raises(ValueError, match=r"quantization 'int8' was asked for, but this checkpoint is already "
                                         r"quantized \(gptq"):
        load_model_files(tmp_path / "q", torch.float32, "int8")
    with pytest.raises(ValueError, match="quantization 'awq' was asked for"):
        load_model_files(tmp_path / "q", torch.float32, "awq")
    with pytest.raises(ValueError, match="quantization 'gptq' loads a Hugging Face directory"):
        load_model_files(tmp_path / "ref", torch.float32, "gptq")
    # "dequantize": full-precision weights, equal to the reference checkpoint's
    files = load_model_files(tmp_path / "q", torch.float32, "dequantize")
    assert files.config.quantization is None
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    got = dict(files.weights)
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# -- TP = 2 (gloo): act order across a row-parallel split -------------------------------------------------
TP = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_case(rank: int) -> None:
    gen = torch.Generator().manual_seed(5)
    cfg = parse_quantization_config(qconfig("gptq", 32, True))
    # qkv: column parallel (4 heads, 2 KV heads of 16), q/k/v sharing one act order
    qkv = QKVParallelLinear(64, 16, 4, 2, dtype=torch.float32, linear_method=ActOrderInt4LinearMethod(32))
    refs = {}
    for shard, rows in (("q", 64), ("k", 32), ("v", 32)):
        t, refs[shard] = checkpoint_tensors("gptq", torch.randn(rows, 64, generator=gen), 32, True, seed=7)
        for name, value in _repacked(cfg, t).items():
            qkv.weight_loader(getattr(qkv, name), value, shard)
    # o_proj: row parallel, 128 inputs in 4 act-order groups of 32; each rank's 64 columns cut groups apart
    row = RowParallelLinear(128, 64, dtype=torch.float32, linear_method=ActOrderInt4LinearMethod(32))
    t, ref_row = checkpoint_tensors("gptq", torch.randn(64, 128, generator=gen), 32, True, seed=8)
    for name, value in _repacked(cfg, t).items():
        row.weight_loader(getattr(row, name), value)
    for layer in (qkv, row):
        layer.process_weights_after_loading()
    assert row.in_pad  # this rank's slice pads its partial groups
    mine = torch.cat([refs["q"][rank * 32:(rank + 1) * 32], refs["k"][rank * 16:(rank + 1) * 16],
                      refs["v"][rank * 16:(rank + 1) * 16]])
    assert torch.equal(qkv.linear_method.dequantized(qkv), mine)
    assert torch.equal(row.linear_method.dequantized(row), ref_row[:, rank * 64:(rank + 1) * 64])
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(qkv(x), F.linear(x, mine), rtol=1e-5, atol=1e-5)
    h = torch.randn(3, 128, generator=torch.Generator().manual_seed(10))
    y = row(h[:, rank * 64:(rank + 1) * 64])  # all-reduced over the two ranks
    torch.testing.assert_close(y, F.linear(h, ref_row), rtol=1e-5, atol=1e-5)


def _tp_run(rank: int, port: int) -> None:
    from fleetlm.distributed.parallel_state import (
        ParallelConfig,
        destroy_distributed,
        init_distributed,
    )

    torch.set_num_threads(1)
    init_distributed(ParallelConfig(TP, 1), rank, torch.device("cpu"), init_method=f"tcp://127.0.0.1:{port}")
    try:
        _tp_case(rank)
    finally:
        destroy_distributed()


def test_tp2_act_order_ranks_hold_their_slices():
    torch.multiprocessing.spawn(_tp_run, args=(_port(),), nprocs=TP, join=True)


def test_tp2_act_order_model_matches_its_dequantized_fp32_checkpoint(tiny_src, tmp_path):
    """The whole route at TP = 2 (multiproc, gloo): merged layers from parts, row-parallel slices
    that cut act-order groups apart."""
    from fleetlm import LLM

    _quantize_dir(tiny_src, tmp_path / "q", tmp_path / "ref", method="gptq", group=32, act_order=True)
    with LLM(str(tmp_path / "ref"), dtype="float32", kv_cache_memory=16 << 20) as llm:
        ref = _greedy(llm)
    with LLM(str(tmp_path / "q"), dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2) as llm:
        got = _greedy(llm)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]


def test_training_a_gptq_directory_starts_from_its_dequantized_weights(tiny_src, tmp_path):
    """``fleetlm train`` on a GPTQ directory (no model.quantization) trains fp32 weights equal to
    the checkpoint's dequantized ones."""
    from fleetlm.train.config import ModelSection
    from fleetlm.train.model import build_train_model

    _quantize_dir(tiny_src, tmp_path / "q", tmp_path / "ref", method="gptq", group=32, act_order=True)
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    model = build_train_model(ModelSection(path=str(tmp_path / "q"))).model
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    q, k, v = (ref[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    torch.testing.assert_close(params["model.layers.0.self_attn.qkv_proj.weight"], torch.cat([q, k, v]), rtol=0, atol=0)
