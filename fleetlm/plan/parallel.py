"""Choose tensor / pipeline / expert / data / context parallel degrees for an inference workload.

The decision rules, in order (each chosen degree carries a one-line reason):

1. MLA + MoE (DeepSeek-style): MLA's latent KV is not split by TP (each TP rank would hold all
   of it), so try data-parallel attention (TP=1) with experts spread over every GPU (EP=G) first.
2. TP: start from the smallest TP inside one node that holds the weights and leaves KV room
   for the requested concurrency across the replicas; double it while that still cuts the
   decode time per token (at the requested concurrency) by at least 20%. Memory time falls as
   1/TP, the all-reduce latency does not. Never beyond the node: an all-reduce over the NIC is
   ~10x slower than over NVLink.
3. EP (MoE): experts are sharded whole over the TP GPUs (EP=TP) rather than sliced; when the
   model does not fit a node, spread the experts over more replicas (wide EP) before using PP.
4. PP: only as many stages as needed to fit; each stage adds latency and bubbles.
5. CP (``parallel_rules``): one sequence's KV exceeds a GPU's budget, or a very long prompt.
6. DP: the remaining GPUs become independent replicas; throughput scales with them.
7. Disaggregated prefill/decode (``parallel_rules``): high concurrency and prefill-heavy load.
"""

from __future__ import annotations

from fleetlm.plan.errors import PlanError
from fleetlm.plan.formats import WeightFormat
from fleetlm.plan.hardware import HardwareSpec
from fleetlm.plan.model_spec import ModelSpec
from fleetlm.plan.parallel_rules import choose_cp, disaggregation
from fleetlm.plan.parallel_types import Forced, ParallelPlan, PlanContext
from fleetlm.plan.roofline import Machine, step_cost
from fleetlm.plan.workload import Layout, Workload

__all__ = ["Forced", "ParallelPlan", "plan_parallel", "tp_candidates", "validate"]

GiB = 1 << 30
TP_MIN_GAIN = 0.2


def tp_candidates(m: ModelSpec, limit: int) -> list[int]:
    """TP sizes that split the attention heads evenly and the KV heads evenly (or replicate)."""
    kv = m.kv_heads_cached if not m.uses_mla else m.num_heads
    return [t for t in range(1, limit + 1)
            if m.num_heads % t == 0 and (kv % t == 0 or t % kv == 0)]


def validate(m: ModelSpec, gpus: int, f: Forced) -> None:
    for name in ("tp", "pp", "ep", "dp", "cp"):
        v = getattr(f, name)
        if v is not None and v < 1:
            raise PlanError(f"--{name} must be >= 1, got {v}")
    if f.tp and m.num_heads % f.tp:
        ok = ", ".join(map(str, tp_candidates(m, m.num_heads)))
        raise PlanError(f"--tp {f.tp} does not divide the {m.num_heads} attention heads of "
                        f"{m.name}; accepted values: {ok}")
    if f.ep and f.ep > 1 and not m.is_moe:
        raise PlanError(f"--ep {f.ep} given, but {m.name} is not a mixture-of-experts model")
    if f.ep and m.is_moe and f.ep > m.num_experts:
        raise PlanError(f"--ep {f.ep} exceeds the {m.num_experts} experts of {m.name}")
    if f.pp and f.pp > m.num_layers:
        raise PlanError(f"--pp {f.pp} exceeds the {m.num_layers} layers of {m.name}")
    fixed = [getattr(f, n) or 1 for n in ("tp", "pp", "cp")]
    per_replica = fixed[0] * fixed[1] * fixed[2]
    if gpus % per_replica:
        raise PlanError(f"--gpus {gpus} is not a multiple of tp*pp*cp = {per_replica}")
    if f.dp and (gpus % f.dp or (f.tp and f.pp and per_replica * f.dp != gpus)):
        raise PlanError(f"contradictory flags: --dp {f.dp} with tp*pp*cp = {per_replica} does "
                        f"not make --gpus {gpus}")


def plan_parallel(m: ModelSpec, fmt: WeightFormat | None, hw: HardwareSpec, w: Workload,
                  gpus: int, forced: Forced | None = None) -> ParallelPlan:
    f = forced or Forced()
    validate(m, gpus, f)
    ctx = PlanContext(m, fmt, hw, w, gpus)
    reasons: list[str] = []
    lay = _choose_model_parallel(ctx, f, reasons)
    lay = choose_cp(ctx, f, lay, reasons)
    mp = ctx.mem(lay)
    reasons.append(f"DP={lay.dp}: " + ("the remaining GPUs serve as independent replicas; "
                   "throughput scales with them, no communication between them" if lay.dp > 1
                   else "all GPUs are used by one replica"))
    plan = ParallelPlan(lay, mp, tuple(reasons))
    return disaggregation(ctx, plan)


def _ep_for(ctx: PlanContext, f: Forced, tp: int, dp: int) -> int:
    if not ctx.m.is_moe:
        return 1
    if f.ep:
        if (tp * dp) % f.ep:
            raise PlanError(f"--ep {f.ep} must divide tp*dp = {tp * dp} (experts live on GPUs "
                            "of the deployment)")
        return f.ep
    return min(tp, ctx.m.num_experts)


def _layout(ctx: PlanContext, f: Forced, tp: int, pp: int, cp: int = 1, ep: int | None = None) -> Layout:
    dp = ctx.gpus // (tp * pp * cp)
    return Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep or _ep_for(ctx, f, tp, dp))


def _choose_model_parallel(ctx: PlanContext, f: Forced, reasons: list[str]) -> Layout:
    m, hw, gpus = ctx.m, ctx.hw, ctx.gpus
    pp_given, cp = f.pp or 1, f.cp or 1
    if f.dp and not (f.tp and f.pp):
        return _fixed_dp(ctx, f, reasons)
    if f.tp:
        lay = _layout(ctx, f, f.tp, pp_given, cp)
        reasons.append(f"TP={f.tp}" + (f", PP={pp_given}" if f.pp else "") + ": given on the command line")
        _explain_ep(ctx, lay, reasons)
        return lay
    node = min(hw.devices_per_node, gpus // (pp_given * cp))
    cands = [t for t in tp_candidates(m, max(1, node)) if gpus % (t * pp_given * cp) == 0] or [1]
    if m.uses_mla and m.is_moe and not f.pp and not f.ep:
        lay = _layout(ctx, f, 1, 1, cp, ep=_widest_ep(m, gpus // cp))
        if ctx.ok(lay):
            reasons.append("TP=1 (data-parallel attention): MLA's latent KV is not split by TP, "
                           "every TP rank would hold all of it")
            _explain_ep(ctx, lay, reasons)
            return lay
    fitting = [t for t in cands if ctx.mem(_layout(ctx, f, t, pp_given, cp)).fits]
    enough = [t for t in fitting if ctx.ok(_layout(ctx, f, t, pp_given, cp))]
    if enough:
        lay = _grow_tp(ctx, f, enough, pp_given, cp, reasons)
    elif fitting:
        lay = _layout(ctx, f, fitting[-1], pp_given, cp)
        reasons.append(f"TP={lay.tp}: the largest TP inside one node, for the most KV room; it "
                       f"still holds only {ctx.mem(lay).max_concurrent_seqs} of the "
                       f"{ctx.w.concurrency} sequences (the rest queue)")
    else:
        top = cands[-1]
        if m.is_moe and not f.ep and gpus > top:
            wide = _layout(ctx, f, top, pp_given, cp, ep=_widest_ep(m, gpus // cp))
            if ctx.mem(wide).fits:
                reasons.append(f"TP={top}: one full node")
                _explain_ep(ctx, wide, reasons)
                return wide
        return _choose_pp(ctx, f, top, cp, reasons)
    _explain_ep(ctx, lay, reasons)
    if pp_given > 1:
        reasons.append(f"PP={pp_given}: given on the command line")
    return lay


def _fixed_dp(ctx: PlanContext, f: Forced, reasons: list[str]) -> Layout:
    """``--dp`` given: each replica has ``gpus / dp`` GPUs; TP as large as a node allows."""
    assert f.dp is not None
    replica = ctx.gpus // (f.dp * (f.cp or 1))
    if f.tp:
        tp = f.tp
    else:
        fits_node = [t for t in tp_candidates(ctx.m, min(replica, ctx.hw.devices_per_node))
                     if replica % t == 0]
        tp = fits_node[-1] if fits_node else 1
    pp = f.pp or replica // tp
    if tp * pp * (f.cp or 1) * f.dp != ctx.gpus:
        raise PlanError(f"contradictory flags: --dp {f.dp} leaves {replica} GPU(s) per replica, "
                        f"which TP={tp} x PP={pp} does not fill")
    lay = _layout(ctx, f, tp, pp, f.cp or 1)
    reasons.append(f"TP={tp}: --dp {f.dp} leaves {replica} GPU(s) per replica; the largest TP "
                   "inside one node" + (", given" if f.tp else ""))
    if pp > 1:
        reasons.append(f"PP={pp}: fills the rest of the replica")
    _explain_ep(ctx, lay, reasons)
    return lay


def _seconds_per_token(ctx: PlanContext, lay: Layout) -> float:
    """Decode time per generated token across the deployment at the requested concurrency."""
    served = max(1, min(ctx.w.concurrency, ctx.mem(lay).max_concurrent_seqs))
    batch = -(-served // lay.dp)
    mc = Machine(ctx.m, ctx.fmt, ctx.w.kv_dtype, ctx.hw, lay)
    return step_cost(mc, "decode", batch, 1, ctx.w.decode_context).time_s / served


def _grow_tp(ctx: PlanContext, f: Forced, enough: list[int], pp: int, cp: int,
             reasons: list[str]) -> Layout:
    """From the smallest sufficient TP, double while it still cuts time per token by
    ``TP_MIN_GAIN`` (memory time falls as 1/TP; all-reduce cost does not)."""
    tp = enough[0]
    cost = _seconds_per_token(ctx, _layout(ctx, f, tp, pp, cp))
    gain = 0.0
    for nxt in enough[1:]:
        c = _seconds_per_token(ctx, _layout(ctx, f, nxt, pp, cp))
        gain = 1 - c / cost
        if gain < TP_MIN_GAIN:
            break
        tp, cost, gain = nxt, c, 1.0
    lay = _layout(ctx, f, tp, pp, cp)
    gib = ctx.mem(lay).weights_bytes_per_gpu / GiB
    why = (f"TP={tp}: holds the weights ({gib:.1f} GiB/GPU) with KV for {ctx.w.concurrency} "
           f"sequence(s); ")
    if len(enough) == 1 and tp == 1:
        why += "no other TP size fits the heads and devices"
    elif tp == enough[-1]:
        why += "the largest TP available inside one node (past it all-reduce runs over the NIC)"
    else:
        why += f"doubling TP would cut time per token by only {max(gain, 0):.1%} (diminishing returns)"
    reasons.append(why)
    return lay


def _widest_ep(m: ModelSpec, gpus: int) -> int:
    ep = min(gpus, m.num_experts)
    while m.num_experts % ep or gpus % ep:
        ep -= 1
    return ep


def _choose_pp(ctx: PlanContext, f: Forced, tp: int, cp: int, reasons: list[str]) -> Layout:
    if f.pp:
        lay = _layout(ctx, f, tp, f.pp, cp)
        reasons.append(f"TP={tp}: one full node; PP={f.pp}: given on the command line")
        return lay
    options = [p for p in range(2, ctx.m.num_layers + 1) if ctx.gpus % (tp * p * cp) == 0]
    fitting = [p for p in options if ctx.mem(_layout(ctx, f, tp, p, cp)).fits]
    enough = [p for p in fitting if ctx.ok(_layout(ctx, f, tp, p, cp))]
    pp = (enough or fitting)[0] if (enough or fitting) else (options or [1])[-1]
    lay = _layout(ctx, f, tp, pp, cp)
    if ctx.gpus <= tp:
        reasons.append(f"TP={tp}: even all {ctx.gpus} GPU(s) cannot hold the weights and one "
                       "sequence's KV")
    else:
        reasons.append(f"TP={tp}: one full node is not enough, and TP stops at the node "
                       "boundary (all-reduce over the NIC is ~10x slower than NVLink)")
    if pp > 1:
        reasons.append(f"PP={pp}: the fewest pipeline stages that fit the weights"
                       + ("" if enough else " (not enough KV for the requested concurrency)"))
    _explain_ep(ctx, lay, reasons)
    return lay


def _explain_ep(ctx: PlanContext, lay: Layout, reasons: list[str]) -> None:
    if not ctx.m.is_moe:
        return
    if lay.ep <= lay.tp:
        reasons.append(f"EP={lay.ep}: each GPU of the TP group holds {ctx.m.num_experts // lay.ep} "
                       "whole experts instead of a slice of every expert (larger GEMMs)")
    else:
        reasons.append(f"EP={lay.ep}: experts hold most of the weights; spreading them over "
                       f"{lay.ep} GPUs of {lay.ep // lay.tp} replicas fits without pipeline stages")
