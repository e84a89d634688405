"""Assemble a full inference plan (memory, KV, roofline, parallelism) and its JSON form."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fleetlm.plan.errors import PlanError
from fleetlm.plan.formats import (
    NATIVE,
    WeightFormat,
    canonical_dtype,
    kv_dtype_bytes,
    weight_format,
)
from fleetlm.plan.hardware import HardwareSpec
from fleetlm.plan.memory import kv_bytes_per_seq, kv_bytes_per_token, weights_bytes
from fleetlm.plan.model_spec import ModelSpec, ParamCounts, count_params
from fleetlm.plan.parallel import Forced, ParallelPlan, plan_parallel
from fleetlm.plan.roofline import Machine, StepCost, critical_batch, step_cost
from fleetlm.plan.workload import Workload


@dataclass(frozen=True)
class Roofline:
    peak_flops: float
    mem_bandwidth: float
    compute_dtype: str
    decode: StepCost
    decode_b1: StepCost
    prefill: StepCost
    decode_max: StepCost | None
    critical_batch: int | None
    replicas: int

    @property
    def ridge_intensity(self) -> float:
        return self.peak_flops / self.mem_bandwidth

    @property
    def ttft_s(self) -> float:
        return self.prefill.time_s

    @property
    def tpot_s(self) -> float:
        return self.decode.time_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.replicas * self.decode.seqs / self.decode.time_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.replicas * self.prefill.tokens / self.prefill.time_s

    def points(self) -> list[StepCost]:
        pts = [self.decode_b1, self.decode, self.prefill]
        if self.decode_max is not None:
            pts.insert(2, self.decode_max)
        seen, out = set(), []
        for p in pts:
            if (p.name, p.tokens) not in seen:
                seen.add((p.name, p.tokens))
                out.append(p)
        return out

    def as_dict(self) -> dict[str, object]:
        return {
            "peak_flops": self.peak_flops, "mem_bandwidth": self.mem_bandwidth,
            "compute_dtype": self.compute_dtype, "ridge_intensity": self.ridge_intensity,
            "decode": self.decode.as_dict(), "decode_batch1": self.decode_b1.as_dict(),
            "prefill": self.prefill.as_dict(), "critical_batch": self.critical_batch,
            "ttft_s": self.ttft_s, "tpot_s": self.tpot_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
        }


@dataclass(frozen=True)
class InferenceReport:
    model: ModelSpec
    counts: ParamCounts
    dtype: str
    hw: HardwareSpec
    gpus: int
    workload: Workload
    plan: ParallelPlan
    roofline: Roofline
    weights_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_seq: int
    warnings: tuple[str, ...] = field(default=())

    @property
    def kv_bytes_total(self) -> int:
        return self.kv_bytes_per_seq * self.workload.concurrency

    def as_json(self) -> dict[str, object]:
        mp, w, lay = self.plan.memory, self.workload, self.plan.layout
        return {
            "mode": "inference", "model": self.model.name, "hardware": self.hw.name,
            "gpus": self.gpus, "dtype": self.dtype, "kv_dtype": w.kv_dtype,
            "context": w.context, "concurrency": w.concurrency, "input_len": w.prompt_len,
            "output_len": w.gen_len, "block_size": w.block_size,
            "params_total": self.counts.total, "params_active": self.counts.active,
            "weights_bytes": self.weights_bytes, "weights_bytes_per_gpu": mp.weights_bytes_per_gpu,
            "activation_bytes_per_gpu": mp.activation_bytes_per_gpu,
            "usable_bytes_per_gpu": mp.usable_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_bytes_per_token_per_gpu": mp.kv_bytes_per_token_per_gpu,
            "kv_bytes_per_seq": self.kv_bytes_per_seq, "kv_bytes_total": self.kv_bytes_total,
            "kv_budget_bytes_per_gpu": mp.kv_budget_bytes_per_gpu,
            "kv_num_blocks_per_gpu": mp.kv_num_blocks_per_gpu,
            "max_seqs_per_replica": mp.max_seqs_per_replica,
            "max_concurrent_seqs": mp.max_concurrent_seqs, "fits": mp.fits,
            **lay.as_dict(), "disaggregate": self.plan.disaggregate,
            "prefill_replicas": self.plan.prefill_replicas,
            "decode_replicas": self.plan.decode_replicas,
            "reasons": list(self.plan.reasons), "warnings": list(self.warnings),
            "roofline": self.roofline.as_dict(),
        }


def resolve_format(m: ModelSpec, dtype: str, int4_group_size: int = 128) -> WeightFormat | None:
    """``None`` stands for the GGUF file's own bytes (``--dtype native``)."""
    if canonical_dtype(dtype) == NATIVE:
        if m.native_weights_bytes is None:
            raise PlanError(f"--dtype native needs a GGUF model; {m.name!r} comes from {m.source}")
        return None
    return weight_format(dtype, int4_group_size)


def plan_inference(m: ModelSpec, hw: HardwareSpec, *, gpus: int = 1, dtype: str = "bf16",
                   workload: Workload | None = None, forced: Forced | None = None,
                   int4_group_size: int = 128) -> InferenceReport:
    """The whole inference plan for ``gpus`` devices of ``hw`` (see docs/PLAN.md)."""
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    w = workload or Workload()
    kv_dtype_bytes(w.kv_dtype)  # validates the name
    fmt = resolve_format(m, dtype, int4_group_size)
    plan = plan_parallel(m, fmt, hw, w, gpus, forced)
    roof = _roofline(m, fmt, hw, w, plan)
    return InferenceReport(
        m, count_params(m), fmt.name if fmt else f"native ({m.native_weight_format})", hw, gpus,
        w, plan, roof, weights_bytes(m, fmt), kv_bytes_per_token(m, w.kv_dtype),
        kv_bytes_per_seq(m, w.context, w.kv_dtype), tuple(_warnings(m, fmt, hw, w, plan)))


def _roofline(m: ModelSpec, fmt: WeightFormat | None, hw: HardwareSpec, w: Workload,
              plan: ParallelPlan) -> Roofline:
    lay, mp = plan.layout, plan.memory
    mc = Machine(m, fmt, w.kv_dtype, hw, lay)
    batch = max(1, min(math.ceil(w.concurrency / lay.dp), mp.max_seqs_per_replica or 1))
    ctx = w.decode_context
    decode = step_cost(mc, "decode", batch, 1, ctx)
    top = mp.max_seqs_per_replica
    decode_max = step_cost(mc, "decode", top, 1, ctx) if top > batch else None
    peak, compute = hw.flops_for(fmt.compute if fmt else "bf16")
    return Roofline(peak, hw.mem_bandwidth, compute, decode, step_cost(mc, "decode", 1, 1, ctx),
                    step_cost(mc, "prefill", 1, w.prompt_len, w.prompt_len), decode_max,
                    critical_batch(mc, ctx), lay.dp)


def _warnings(m: ModelSpec, fmt: WeightFormat | None, hw: HardwareSpec, w: Workload,
              plan: ParallelPlan) -> list[str]:
    out, mp, lay = [], plan.memory, plan.layout
    if not mp.fits:
        out.append("does not fit: weights + activations leave no room for one "
                   f"{w.context}-token sequence per replica; use more GPUs, a smaller dtype "
                   "(--dtype fp8/int4) or a shorter --context")
    elif mp.max_concurrent_seqs < w.concurrency:
        out.append(f"KV cache holds {mp.max_concurrent_seqs} sequences of {w.context} tokens, "
                   f"fewer than --concurrency {w.concurrency}: the rest wait in the queue")
    if m.max_position_embeddings and w.context > m.max_position_embeddings:
        out.append(f"--context {w.context} exceeds the model's max_position_embeddings "
                   f"{m.max_position_embeddings}")
    if not m.uses_mla and lay.tp > m.num_kv_heads:
        out.append(f"TP={lay.tp} > {m.num_kv_heads} KV heads: KV heads are replicated, each GPU "
                   "still stores one whole KV head per layer")
    if m.uses_mla and lay.tp > 1:
        out.append(f"MLA latent KV is replicated on each of the {lay.tp} TP ranks")
    if fmt and fmt.compute == "fp8" and "fp8" not in hw.peak_flops:
        out.append(f"{hw.name} has no FP8 tensor cores: fp8 weights compute at bf16 speed")
    if hw.is_cpu and fmt and fmt.compute == "fp8":
        out.append("fp8 on a CPU is a storage format only")
    return out
