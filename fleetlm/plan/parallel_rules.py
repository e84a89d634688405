"""Late parallelism rules: context parallelism and disaggregated prefill/decode.

* CP: split one sequence over GPUs when its KV alone exceeds a GPU's budget, or when the
  context is very long (>= 64K) and the prefill of one prompt takes over 10 s.
* Disaggregation: with >= 2 replicas and >= 32 concurrent sequences, when prefill would take
  over 20% of the GPUs' time (``B * t_prefill / (output_len * t_decode)`` prefill time per unit
  of decode time), prefill gets its own replicas so long prompts stop stalling decode.
"""

from __future__ import annotations

from dataclasses import replace

from fleetlm.plan.parallel_types import Forced, ParallelPlan, PlanContext
from fleetlm.plan.roofline import Machine, step_cost
from fleetlm.plan.workload import Layout

LONG_CONTEXT = 65536
TTFT_TARGET_S = 10.0
DISAGG_PREFILL_SHARE = 0.2
DISAGG_MIN_CONCURRENCY = 32


def choose_cp(ctx: PlanContext, f: Forced, lay: Layout, reasons: list[str]) -> Layout:
    if f.cp:
        if f.cp > 1:
            reasons.append(f"CP={f.cp}: given on the command line")
        return lay
    mp = ctx.mem(lay)
    one_seq_fits = mp.kv_budget_bytes_per_gpu >= mp.kv_bytes_per_seq_per_gpu
    mc = Machine(ctx.m, ctx.fmt, ctx.w.kv_dtype, ctx.hw, lay)
    ttft = step_cost(mc, "prefill", 1, ctx.w.prompt_len, ctx.w.prompt_len).time_s
    long_slow = ctx.w.context >= LONG_CONTEXT and ttft > TTFT_TARGET_S
    if (one_seq_fits or mp.kv_budget_bytes_per_gpu <= 0) and not long_slow:
        return lay
    cp = 2
    while lay.dp % cp == 0 and lay.dp >= cp:
        cand = replace(lay, cp=cp, dp=lay.dp // cp)
        mpc = ctx.mem(cand)
        ttft_c = step_cost(replace(mc, layout=cand), "prefill", 1, ctx.w.prompt_len,
                           ctx.w.prompt_len).time_s
        if mpc.fits and (ttft_c <= TTFT_TARGET_S or not long_slow):
            why = (f"one {ctx.w.context}-token sequence's KV exceeds a GPU's KV budget"
                   if not one_seq_fits else f"a {ctx.w.prompt_len}-token prefill takes {ttft:.1f} s "
                   f"on one replica; CP={cp} brings it to {ttft_c:.1f} s")
            reasons.append(f"CP={cp}: {why}")
            return cand
        cp *= 2
    return lay


def disaggregation(ctx: PlanContext, plan: ParallelPlan) -> ParallelPlan:
    lay, w = plan.layout, ctx.w
    if lay.dp < 2 or w.concurrency < DISAGG_MIN_CONCURRENCY or not plan.memory.fits:
        return plan
    mc = Machine(ctx.m, ctx.fmt, w.kv_dtype, ctx.hw, lay)
    batch = max(1, min(-(-w.concurrency // lay.dp), plan.memory.max_seqs_per_replica))
    t_prefill = step_cost(mc, "prefill", 1, w.prompt_len, w.prompt_len).time_s
    t_decode = step_cost(mc, "decode", batch, 1, w.decode_context).time_s
    ratio = batch * t_prefill / (w.gen_len * t_decode)  # prefill time per unit of decode time
    share = ratio / (1 + ratio)
    if share < DISAGG_PREFILL_SHARE:
        return plan
    n_prefill = min(lay.dp - 1, max(1, round(lay.dp * share)))
    reason = (f"disaggregate: prefill would take {share:.0%} of the GPUs' time at concurrency "
              f"{w.concurrency}; {n_prefill} prefill + {lay.dp - n_prefill} decode replicas "
              "keep long prompts from stalling decode")
    return replace(plan, reasons=(*plan.reasons, reason), disaggregate=True,
                   prefill_replicas=n_prefill, decode_replicas=lay.dp - n_prefill)
