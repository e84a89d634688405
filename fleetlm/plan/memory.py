"""Inference memory: weights, KV cache and activations per GPU, and what is left for KV.

Per-GPU weights are those of the heaviest pipeline stage: its blocks' non-expert weights
divided by ``tp`` (tensor parallel splits every matrix), its routed experts divided by ``ep``,
plus the embedding (first stage) and LM head (last stage; a tied embedding is copied there when
``pp > 1``) split over ``tp`` by vocabulary. Norms are small and counted as split too.

KV per GPU: each TP rank holds ``num_kv_heads / tp`` KV heads (at least one: with ``tp >
num_kv_heads`` heads are replicated); MLA's latent is shared by all heads, so every TP rank
holds all of it. A stage holds its own layers; ``cp`` splits a sequence's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleetlm.plan.errors import PlanError
from fleetlm.plan.formats import WeightFormat, canonical_dtype, kv_dtype_bytes
from fleetlm.plan.hardware import HardwareSpec
from fleetlm.plan.kv import kv_cache_num_blocks
from fleetlm.plan.model_spec import ModelSpec, count_params, layer_params
from fleetlm.plan.workload import Layout, Workload

ACT_BYTES = 2  # activations in bf16/fp16


def weights_bytes(m: ModelSpec, fmt: WeightFormat | None) -> int:
    """All weights of the model; ``fmt=None`` means the GGUF file's own tensor bytes."""
    if fmt is None:
        if m.native_weights_bytes is None:
            raise PlanError(f"--dtype native needs a GGUF file; {m.name!r} is from {m.source}")
        return m.native_weights_bytes
    c = count_params(m)
    return fmt.bytes_for(c.matrix, c.embedding_like, c.other)


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Blocks of each pipeline stage, as even as possible (earlier stages take the remainder)."""
    if pp > num_layers:
        raise PlanError(f"pipeline parallel size {pp} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def weights_bytes_per_gpu(m: ModelSpec, fmt: WeightFormat | None, layout: Layout) -> int:
    """Weights on the most loaded GPU (heaviest pipeline stage)."""
    f = fmt or WeightFormat("bf16", 2, 2, 2, "bf16")  # native: scale the bf16 split below
    h, v = m.hidden_size, m.vocab_size
    stages = stage_layers(m.num_layers, layout.pp)
    worst = 0.0
    for s, layers in enumerate(stages):
        total = 0.0
        for i in layers:
            non_expert, experts = layer_params(m, i)
            total += non_expert * f.matrix / layout.tp + experts * f.matrix / layout.ep
        if s == 0:
            total += v * h * f.embed / layout.tp
        if s == len(stages) - 1:
            total += h * f.other / layout.tp  # final norm
            if layout.pp > 1 or not m.tie_word_embeddings:
                total += v * h * f.embed / layout.tp
        worst = max(worst, total)
    if fmt is None:
        worst *= weights_bytes(m, None) / weights_bytes(m, f)
    return math.ceil(worst)


def kv_layer_bytes(m: ModelSpec, kv_dtype: str) -> int:
    """KV bytes of one token in one layer. An ``int8`` cache of per-head rows also holds one
    fp16 scale per (token, head) for K and for V (fleetlm's layout: fleetlm/quantization/kv.py)."""
    scales = 0 if m.uses_mla or canonical_dtype(kv_dtype) != "int8" else 2 * m.num_kv_heads * 2
    return m.kv_values_per_token_layer * kv_dtype_bytes(kv_dtype) + scales


def kv_bytes_per_token(m: ModelSpec, kv_dtype: str) -> int:
    """KV bytes of one token over all layers (no sliding-window savings)."""
    return m.num_layers * kv_layer_bytes(m, kv_dtype)


def kv_bytes_per_seq(m: ModelSpec, seq_len: int, kv_dtype: str, block_size: int = 1) -> int:
    """KV bytes one sequence of ``seq_len`` tokens holds, rounded up to whole blocks.

    Sliding-window layers keep only the last ``sliding_window`` tokens (an engine that frees
    out-of-window blocks, as vLLM's hybrid allocator does).
    """
    per_layer = kv_layer_bytes(m, kv_dtype)
    full, window = m.tokens_held(seq_len)
    blocks = lambda n: math.ceil(n / block_size) * block_size  # noqa: E731
    n_sliding = m.num_layers - m.num_full_layers
    return per_layer * (m.num_full_layers * blocks(full) + n_sliding * blocks(window))


def kv_gpu_share(m: ModelSpec, layout: Layout) -> float:
    """Fraction of a sequence's KV bytes on the most loaded GPU."""
    heads = 1.0 if m.uses_mla else max(1, m.num_kv_heads // layout.tp) / m.num_kv_heads
    layers = len(stage_layers(m.num_layers, layout.pp)[0]) / m.num_layers
    return heads * layers / layout.cp


def activation_bytes_per_gpu(m: ModelSpec, hw: HardwareSpec, layout: Layout, w: Workload) -> int:
    """Peak activations of one step of ``max_batched_tokens`` tokens, plus runtime overhead.

    An estimate (an engine measures it by profiling one dummy step): the residual stream and
    its normed copy, the widest projection output (QKV or gate+up) and the MLP product, for
    every batched token, in 16 bits; plus fp32 logits for up to 256 sampled sequences.
    """
    t, h = w.max_batched_tokens, m.hidden_size
    ffn = mlp_width(m)
    qkv = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
    per_token = 3 * h + max(qkv, 2 * ffn) / layout.tp + ffn / layout.tp
    logits = min(t, 256) * m.vocab_size * 4
    return math.ceil(t * per_token * ACT_BYTES + logits) + hw.runtime_overhead_bytes


def mlp_width(m: ModelSpec) -> int:
    """Intermediate width one token passes through (active experts for MoE)."""
    if not m.is_moe:
        return m.intermediate_size
    moe = m.num_experts_per_tok * m.moe_intermediate_size + m.shared_expert_intermediate_size
    return max(moe, m.intermediate_size if m.num_dense_layers else 0)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory of one layout, and the KV capacity it leaves."""

    usable_bytes: int
    weights_bytes_per_gpu: int
    activation_bytes_per_gpu: int
    kv_budget_bytes_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    kv_bytes_per_seq_per_gpu: int
    kv_num_blocks_per_gpu: int
    max_seqs_per_replica: int
    max_concurrent_seqs: int

    @property
    def fits(self) -> bool:
        """Weights and activations fit, with room for at least one full-context sequence."""
        return self.max_seqs_per_replica >= 1


def memory_plan(m: ModelSpec, fmt: WeightFormat | None, hw: HardwareSpec, layout: Layout,
                w: Workload) -> MemoryPlan:
    usable = int(hw.memory_bytes * w.memory_utilization)
    weights = weights_bytes_per_gpu(m, fmt, layout)
    act = activation_bytes_per_gpu(m, hw, layout, w)
    budget = usable - weights - act
    share = kv_gpu_share(m, layout)
    per_token = math.ceil(kv_bytes_per_token(m, w.kv_dtype) * share)
    per_seq = math.ceil(kv_bytes_per_seq(m, w.context, w.kv_dtype, w.block_size) * share)
    try:
        blocks = kv_cache_num_blocks(budget, w.block_size, per_token)
    except ValueError:
        blocks = 0
    seqs = max(0, budget) // per_seq
    return MemoryPlan(usable, weights, act, budget, per_token, per_seq, blocks, seqs,
                      seqs * layout.dp)
