"""Roofline model of one forward step: FLOPs, bytes moved and communication per GPU.

``time = max(flops / peak, bytes / bandwidth) + communication`` (communication is not assumed
to overlap). Quantities are per GPU, summed over pipeline stages, since one step runs the stages
one after another (no micro-batching, the latency view).

* FLOPs: ``2 * tokens * active matrix params`` (every multiply-add is 2 FLOPs), the LM head only
  for one sampled position per sequence, and attention ``2 * heads * (d_qk + d_v)`` per
  (query, key) pair; a causal prefill of N tokens has N(N+1)/2 pairs.
* Bytes: every non-expert weight once per step; for MoE the experts that some token of the
  batch selects (``E * (1 - (1 - k/E)^T)`` per layer under uniform routing); the KV cache read
  by decode (or written by prefill); activations in and out of each matmul.
* Communication: TP all-reduce of the hidden state twice per layer (ring: ``2 (tp-1)/tp``
  of the message over the link, plus a fixed latency), EP all-to-all (dispatch and combine),
  PP point-to-point sends, CP ring exchange of the sequence's KV.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fleetlm.plan.formats import WeightFormat, kv_dtype_bytes
from fleetlm.plan.hardware import HardwareSpec
from fleetlm.plan.memory import ACT_BYTES, kv_bytes_per_seq, kv_gpu_share, mlp_width, weights_bytes
from fleetlm.plan.model_spec import ModelSpec, count_params, mlp_params
from fleetlm.plan.workload import Layout


@dataclass(frozen=True)
class StepCost:
    """Cost of one forward step on the most loaded GPU of a replica."""

    name: str
    tokens: int
    seqs: int
    context: int
    flops: float
    bytes: float
    t_compute_s: float
    t_memory_s: float
    t_comm_s: float

    @property
    def time_s(self) -> float:
        return max(self.t_compute_s, self.t_memory_s) + self.t_comm_s

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")

    @property
    def bound(self) -> str:
        if self.t_comm_s > max(self.t_compute_s, self.t_memory_s):
            return "communication"
        return "compute" if self.t_compute_s >= self.t_memory_s else "memory"

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "time_s": self.time_s, "intensity": self.intensity,
                "bound": self.bound}


@dataclass(frozen=True)
class Machine:
    """Everything fixed across steps: model, weight format, KV dtype, hardware and layout."""

    model: ModelSpec
    fmt: WeightFormat | None
    kv_dtype: str
    hw: HardwareSpec
    layout: Layout

    @property
    def peak(self) -> float:
        compute = self.fmt.compute if self.fmt else "bf16"
        return self.hw.flops_for(compute)[0]

    @property
    def bytes_per_param(self) -> tuple[float, float, float]:
        """(matrix, embedding, other) bytes per parameter; a GGUF file's own bytes are spread
        over the groups in bf16 proportions."""
        if self.fmt is not None:
            return self.fmt.matrix, self.fmt.embed, self.fmt.other
        bf16 = WeightFormat("bf16", 2, 2, 2, "bf16")
        scale = weights_bytes(self.model, None) / weights_bytes(self.model, bf16)
        return 2 * scale, 2 * scale, 2 * scale

    def link_bw(self, group: int) -> float:
        """Bandwidth of a collective over ``group`` GPUs: scale-up inside a node, else the NIC."""
        inside = group <= self.hw.devices_per_node
        return (self.hw.interconnect_bw if inside else self.hw.network_bw) or self.hw.network_bw or 1e9


def _pairs(n_queries: int, context: int, window: int | None, causal: bool) -> float:
    """(query, key) pairs: decode queries see ``context`` keys; prefill is causal."""
    if not causal:
        return n_queries * (min(context, window) if window else context)
    if not window or window >= n_queries:
        return n_queries * (n_queries + 1) / 2
    return window * (window + 1) / 2 + (n_queries - window) * window


def attention_flops(m: ModelSpec, n_queries: int, context: int, causal: bool) -> float:
    if m.uses_mla and not causal:  # decode with absorbed weights attends over the latent
        per_pair = 2 * m.num_heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
    else:
        per_pair = 2 * m.num_heads * (m.attn_qk_dim + m.attn_v_dim)
    full = m.num_full_layers * _pairs(n_queries, context, None, causal)
    sliding = (m.num_layers - m.num_full_layers) * _pairs(n_queries, context, m.sliding_window, causal)
    return per_pair * (full + sliding)


def experts_touched(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts selected by ``tokens`` tokens under uniform routing."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def step_cost(mc: Machine, name: str, seqs: int, new_tokens: int, context: int) -> StepCost:
    """One step: ``seqs`` sequences, ``new_tokens`` each, KV length ``context`` after the step.

    ``new_tokens == 1`` is a decode step; otherwise a causal prefill of ``new_tokens`` tokens.
    """
    m, lay, c = mc.model, mc.layout, count_params(mc.model)
    mat_b, emb_b, oth_b = mc.bytes_per_param
    tokens = seqs * new_tokens
    causal = new_tokens > 1
    lm_head = m.vocab_size * m.hidden_size
    non_expert = c.attention + c.dense_mlp + c.shared_experts
    flops = 2 * tokens * (non_expert + c.router + c.active_experts) + 2 * seqs * lm_head
    flops += seqs * attention_flops(m, new_tokens, context, causal)
    expert = mlp_params(m, m.moe_intermediate_size) if m.is_moe else 0
    pooled = tokens * max(1, lay.ep // lay.tp)  # wide EP: tokens of ep/tp replicas meet
    touched = experts_touched(m.num_experts, m.num_experts_per_tok, pooled) * m.num_moe_layers
    weight_bytes = (non_expert * mat_b + c.other * oth_b + lm_head * emb_b) / lay.tp
    weight_bytes += touched * expert * mat_b / lay.ep + tokens * m.hidden_size * emb_b
    kv_seq = kv_bytes_per_seq(m, context, mc.kv_dtype)
    kv_new = new_tokens * m.num_layers * m.kv_values_per_token_layer * kv_dtype_bytes(mc.kv_dtype)
    kv_bytes = seqs * (kv_seq if not causal else kv_seq + kv_new) * kv_gpu_share(m, lay) * lay.pp
    act_elems = 4 * m.hidden_size + 2 * (m.num_heads + m.num_kv_heads) * m.head_dim + 6 * mlp_width(m)
    act_bytes = tokens * m.num_layers * act_elems * ACT_BYTES / lay.tp
    gpu_flops = flops / (lay.tp * lay.cp)
    gpu_bytes = weight_bytes + (kv_bytes + act_bytes) / lay.cp
    comm = _comm_s(mc, tokens, kv_seq * seqs if causal else 0.0)
    return StepCost(name, tokens, seqs, context, gpu_flops, gpu_bytes,
                    gpu_flops / mc.peak, gpu_bytes / mc.hw.mem_bandwidth, comm)


def _comm_s(mc: Machine, tokens: int, prefill_kv_bytes: float) -> float:
    m, lay, hw = mc.model, mc.layout, mc.hw
    msg = tokens * m.hidden_size * ACT_BYTES
    t = 0.0
    if lay.tp > 1:
        per = 2 * (lay.tp - 1) / lay.tp * msg / mc.link_bw(lay.tp) + hw.collective_latency_s
        t += 2 * m.num_layers * per
    if lay.pp > 1:
        t += (lay.pp - 1) * (msg / mc.link_bw(lay.tp * lay.pp) + hw.collective_latency_s)
    if m.is_moe and lay.ep > 1:
        a2a = tokens * m.num_experts_per_tok * m.hidden_size * ACT_BYTES / lay.tp
        per = 2 * (lay.ep - 1) / lay.ep * a2a / mc.link_bw(lay.ep) + hw.collective_latency_s
        t += m.num_moe_layers * per
    if lay.cp > 1 and prefill_kv_bytes:
        t += (lay.cp - 1) / lay.cp * prefill_kv_bytes * kv_gpu_share(m, lay) * lay.cp / mc.link_bw(lay.cp)
    return t


def critical_batch(mc: Machine, context: int, limit: int = 1 << 20) -> int | None:
    """Smallest decode batch at which compute time reaches memory time (None: never, up to
    ``limit``; at long contexts the KV reads grow with the batch as fast as the FLOPs do)."""
    def compute_bound(b: int) -> bool:
        s = step_cost(mc, "decode", b, 1, context)
        return s.t_compute_s >= s.t_memory_s

    if compute_bound(1):
        return 1
    hi = 2
    while not compute_bound(hi):
        if hi >= limit:
            return None
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if compute_bound(mid) else (mid, hi)
    return hi
