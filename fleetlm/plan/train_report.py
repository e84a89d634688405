"""Assemble a training plan: data-parallel strategy, model parallelism, checkpointing, time.

Decision rules: the smallest TP inside a node (then PP) under which some strategy fits; at that
TP prefer no activation checkpointing (recompute costs ~a third more compute), and among the
strategies the least sharded that fits (DDP, ZeRO-1, ZeRO-2, FSDP2: less communication).
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm.plan.errors import PlanError
from fleetlm.plan.hardware import HardwareSpec
from fleetlm.plan.model_spec import ModelSpec, ParamCounts, count_params
from fleetlm.plan.parallel import tp_candidates
from fleetlm.plan.render import Section, fmt_bytes, fmt_count, fmt_time, reason_rows
from fleetlm.plan.training import (
    STRATEGIES,
    StrategyMemory,
    TrainingCompute,
    strategy_memory,
    training_compute,
)

AUTO_ORDER = ("ddp", "zero1", "zero2", "fsdp2")


@dataclass(frozen=True)
class TrainingReport:
    model: ModelSpec
    counts: ParamCounts
    hw: HardwareSpec
    gpus: int
    tp: int
    pp: int
    ep: int
    dp: int
    seq_len: int
    micro_batch: int
    strategy: str
    checkpointing: bool
    fits: bool
    memory: tuple[StrategyMemory, ...]
    compute: TrainingCompute
    mfu: float
    reasons: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        c = self.compute
        return {
            "mode": "training", "model": self.model.name, "hardware": self.hw.name,
            "gpus": self.gpus, "params_total": self.counts.total, "params_active": self.counts.active,
            "weights_bytes": 2 * self.counts.total, "tp": self.tp, "pp": self.pp, "ep": self.ep,
            "dp": self.dp, "strategy": self.strategy, "activation_checkpointing": self.checkpointing,
            "fits": self.fits, "seq_len": self.seq_len, "micro_batch": self.micro_batch,
            "train_tokens": c.tokens, "chinchilla_tokens": c.chinchilla_tokens,
            "train_flops": c.flops, "train_flops_with_attention": c.flops_with_attention,
            "mfu": self.mfu, "wallclock_s": c.wallclock_s, "wallclock_days": c.wallclock_s / 86400,
            "gpu_hours": c.gpu_hours, "memory_per_gpu": {s.strategy: s.as_dict() for s in self.memory},
            "reasons": list(self.reasons),
        }


def plan_training(m: ModelSpec, hw: HardwareSpec, *, gpus: int, tokens: float | None = None,
                  mfu: float = 0.4, seq_len: int = 4096, micro_batch: int = 1,
                  strategy: str | None = None, tp: int | None = None, pp: int | None = None,
                  ep: int | None = None, checkpointing: bool | None = None,
                  memory_utilization: float = 0.9) -> TrainingReport:
    if gpus < 1 or seq_len < 1 or micro_batch < 1:
        raise PlanError("--gpus, --context and --micro-batch must be >= 1")
    if strategy is not None and strategy not in STRATEGIES:
        raise PlanError(f"unknown training strategy {strategy!r}; accepted values: {', '.join(STRATEGIES)}")
    if tp and m.num_heads % tp:
        raise PlanError(f"--tp {tp} does not divide the {m.num_heads} attention heads of {m.name}")
    ep = ep or 1
    if ep > 1 and not m.is_moe:
        raise PlanError(f"--ep {ep} given, but {m.name} is not a mixture-of-experts model")
    node = min(hw.devices_per_node, gpus)
    tps = [tp] if tp else [t for t in tp_candidates(m, node) if gpus % t == 0] or [1]
    pps = [pp] if pp else [1] + [p for p in range(2, m.num_layers + 1)]
    strategies = [strategy] if strategy else list(AUTO_ORDER)
    ckpts = [checkpointing] if checkpointing is not None else [False, True]
    kw = dict(seq_len=seq_len, micro_batch=micro_batch, memory_utilization=memory_utilization)
    choice = None
    for p in pps:
        for t in tps:
            if gpus % (t * p):
                continue
            dp = gpus // (t * p)
            for ck in ckpts:
                for s in strategies:
                    sm = strategy_memory(m, hw, s, dp=dp, tp=t, pp=p, ep=ep, **kw)
                    if (sm.fits_ckpt if ck else sm.fits):
                        choice = (t, p, dp, ck, s)
                        break
                if choice:
                    break
            if choice:
                break
        if choice:
            break
    fits = choice is not None
    if choice is None:
        t, p = tps[-1], (pp or 1)
        choice = (t, p, gpus // (t * p), True, strategy or "fsdp2")
    t, p, dp, ck, s = choice
    memory = tuple(strategy_memory(m, hw, x, dp=dp, tp=t, pp=p, ep=ep, **kw) for x in STRATEGIES)
    compute = training_compute(m, hw, gpus, tokens=tokens, mfu=mfu, seq_len=seq_len)
    reasons = _reasons(m, memory, t, p, dp, ck, s, fits, bool(tp), bool(pp), strategy is not None)
    return TrainingReport(m, count_params(m), hw, gpus, t, p, ep, dp, seq_len, micro_batch, s,
                          ck, fits, memory, compute, mfu, tuple(reasons))


def _reasons(m: ModelSpec, memory: tuple[StrategyMemory, ...], tp: int, pp: int, dp: int,
             ck: bool, s: str, fits: bool, tp_given: bool, pp_given: bool,
             s_given: bool) -> list[str]:
    chosen = next(x for x in memory if x.strategy == s)
    out = [f"{s.upper()}: " + ("given on the command line" if s_given else
           f"the least-sharded strategy that fits ({fmt_bytes(chosen.total_ckpt if ck else chosen.total)}"
           f" of {fmt_bytes(chosen.usable)} per GPU)")]
    out.append(f"TP={tp}: " + ("given on the command line" if tp_given else
               "the smallest TP (inside one node) under which a strategy fits"))
    if pp > 1:
        out.append(f"PP={pp}: " + ("given on the command line" if pp_given else
                   "TP across a node was not enough to fit"))
    out.append(f"checkpointing={'on' if ck else 'off'}: " + (
        f"without it activations take {fmt_bytes(chosen.activations)} per GPU" if ck else
        "activations fit, so no recompute (~33% more compute) is needed"))
    out.append(f"DP={dp}: {dp} data-parallel ranks shard the optimizer state" if s != "ddp"
               else f"DP={dp}: plain data parallel; every rank holds all states")
    if not fits:
        out.append("does not fit: no strategy fits these GPUs; add GPUs, TP/PP or shorten --context")
    return out


def training_sections(r: TrainingReport) -> list[Section]:
    c, m = r.compute, r.model
    model_rows = [
        ("parameters", fmt_count(r.counts.total), f"active {fmt_count(r.counts.active)}"
         + (f"; published: {m.reference}" if m.reference else "")),
        ("tokens", fmt_count(c.tokens), f"Chinchilla-optimal ≈ 20 × params = {fmt_count(c.chinchilla_tokens)}"),
        ("training FLOPs", f"{c.flops:.3e}", f"6 × {fmt_count(c.params_active)} × {fmt_count(c.tokens)}; "
         f"with attention {c.flops_with_attention:.3e}"),
        ("wall-clock", fmt_time(c.wallclock_s), f"FLOPs ÷ ({r.gpus} × {r.hw.flops_for('bf16')[0] / 1e12:,.0f} "
         f"TFLOP/s × MFU {r.mfu}); {c.gpu_hours:,.0f} GPU-hours"),
    ]
    mem_rows = []
    for s in r.memory:
        mark = " ◀" if s.strategy == r.strategy else ""
        mem_rows.append((s.strategy + mark, f"{fmt_bytes(s.total)} / {fmt_bytes(s.total_ckpt)} ckpt",
                         f"params {fmt_bytes(s.params)}, grads {fmt_bytes(s.grads)}, optimizer "
                         f"{fmt_bytes(s.optimizer)}, buffers {fmt_bytes(s.buffers)}, activations "
                         f"{fmt_bytes(s.activations)} / {fmt_bytes(s.activations_ckpt)}"
                         f"{'' if s.fits_ckpt else ' — does not fit'}"))
    title = (f"Memory per GPU (TP={r.tp}, PP={r.pp}, DP={r.dp}, seq {r.seq_len} × micro-batch "
             f"{r.micro_batch}; usable {fmt_bytes(r.memory[0].usable)})")
    return [(f"Training {m.name} on {r.gpus} × {r.hw.name}", model_rows), (title, mem_rows),
            ("Plan", reason_rows(r.reasons))]
