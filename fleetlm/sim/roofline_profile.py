"""Profiles for catalog GPUs without a machine at hand, derived from the planner's roofline.

The coefficients of ``RooflineStepModel`` are read off ``fleetlm.plan.roofline.step_cost``
(decode steps at two context lengths give the per-pair FLOPs and per-KV-token bytes; a prefill
gives the per-token FLOPs; weight bytes and communication are tabulated over the token count),
so a uniform step costs exactly what the planner says, before the efficiencies below.

Assumptions (also written into the profile): real kernels reach ``mfu`` of the dense peak
FLOP/s in compute-bound steps and ``mbu`` of the memory bandwidth in memory-bound ones; each
step pays ``overhead_s`` of scheduling and launch time; communication is not overlapped;
pipeline stages run one after another (no micro-batching); the KV budget is the planner's
``memory_plan`` at ``memory_utilization``.
"""

from __future__ import annotations

import math

from fleetlm.sim.profile import EngineLimits, Profile
from fleetlm.sim.step_model import RooflineStepModel

DEFAULT_MFU = 0.6
DEFAULT_MBU = 0.8
DEFAULT_OVERHEAD_S = 2e-3


def _token_knots(max_tokens: int) -> tuple[int, ...]:
    knots, k = [], 1
    while k < max_tokens:
        knots.append(k)
        k *= 2
    return tuple(knots + [max_tokens])


def roofline_profile(model: str, hardware: str, *, tp: int = 1, pp: int = 1, dtype: str = "bf16",
                     kv_dtype: str = "bf16", block_size: int = 16, max_num_batched_tokens: int = 8192,
                     max_num_seqs: int = 256, max_model_len: int = 8192, memory_utilization: float = 0.9,
                     enable_prefix_caching: bool = True, mfu: float = DEFAULT_MFU, mbu: float = DEFAULT_MBU,
                     overhead_s: float = DEFAULT_OVERHEAD_S) -> Profile:
    """A ``Profile`` for ``model`` on ``tp * pp`` GPUs of catalog ``hardware``.

    Raises ``PlanError`` (a ``ValueError``) for unknown names, a TP that does not divide the
    heads, or a layout whose weights leave no room for one ``max_model_len`` sequence.
    """
    from fleetlm.plan.errors import PlanError
    from fleetlm.plan.hardware import get_hardware
    from fleetlm.plan.memory import kv_bytes_per_token, memory_plan
    from fleetlm.plan.model_load import load_model_spec
    from fleetlm.plan.parallel import Forced, validate
    from fleetlm.plan.report import resolve_format
    from fleetlm.plan.roofline import Machine
    from fleetlm.plan.workload import Layout, Workload

    m, hw = load_model_spec(model), get_hardware(hardware)
    validate(m, tp * pp, Forced(tp=tp, pp=pp))
    fmt = resolve_format(m, dtype)
    lay = Layout(tp=tp, pp=pp, ep=min(tp, m.num_experts) if m.is_moe else 1)  # experts split over the TP GPUs
    w = Workload(context=max_model_len, concurrency=1, output_len=1, kv_dtype=kv_dtype,
                 block_size=block_size, max_batched_tokens=max_num_batched_tokens,
                 memory_utilization=memory_utilization)
    mp = memory_plan(m, fmt, hw, lay, w)
    if not mp.fits:
        raise PlanError(f"{m.name} does not fit on {tp * pp} x {hw.name} (tp={tp}, pp={pp}): weights "
                        f"{mp.weights_bytes_per_gpu / 2**30:.1f} GiB per GPU leave no room for one "
                        f"{max_model_len}-token sequence")
    step = roofline_step_model(Machine(m, fmt, kv_dtype, hw, lay), max_num_batched_tokens, mfu, mbu, overhead_s)
    engine = EngineLimits(block_size, mp.kv_num_blocks_per_gpu, max_num_batched_tokens, max_num_seqs,
                          max_model_len, enable_prefix_caching)
    assumptions = (
        f"roofline of fleetlm.plan for {hw.name}: peak {step.peak_flops / 1e12:.1f} TFLOP/s, "
        f"{hw.mem_bandwidth / 1e12:.2f} TB/s",
        f"kernels reach {mfu:.0%} of peak FLOP/s (mfu) and {mbu:.0%} of memory bandwidth (mbu)",
        f"{overhead_s * 1e3:g} ms of scheduling and launch overhead per step",
        "communication (TP all-reduce, PP sends) not overlapped; PP stages run one after another",
        f"KV cache: {mp.kv_num_blocks_per_gpu} blocks of {block_size} tokens per GPU "
        f"(memory utilization {memory_utilization}, planner's activation estimate)",
    )
    return Profile(m.name, hw.name, "roofline", step, engine, tp=tp, pp=pp, dtype=dtype,
                   kv_bytes_per_token=kv_bytes_per_token(m, kv_dtype), assumptions=assumptions)


def roofline_step_model(mc, max_tokens: int, mfu: float, mbu: float, overhead_s: float) -> RooflineStepModel:
    """Linear FLOPs/bytes coefficients of ``mc`` read off ``step_cost`` (see module docstring)."""
    from fleetlm.plan.roofline import step_cost

    c1, c2, n = 256, 512, 64
    d1, d2 = step_cost(mc, "d", 1, 1, c1), step_cost(mc, "d", 1, 1, c2)
    per_pair = (d2.flops - d1.flops) / (c2 - c1)
    per_kv = (d2.bytes - d1.bytes) / (c2 - c1)
    p = step_cost(mc, "p", 1, n, n)
    per_token = (p.flops - d1.flops - per_pair * (n * (n + 1) / 2 - c1)) / (n - 1)
    per_sampled = d1.flops - per_token - per_pair * c1
    knots = _token_knots(max_tokens)
    base, comm = [], []
    for k in knots:  # a decode of k sequences at context c1, its KV reads taken out
        s = step_cost(mc, "d", k, 1, c1)
        base.append(s.bytes - per_kv * k * c1)
        comm.append(s.t_comm_s)
    return RooflineStepModel(mc.peak, mc.hw.mem_bandwidth, per_token, max(per_sampled, 0.0), per_pair,
                             per_kv, tuple(float(k) for k in knots), tuple(base), tuple(comm),
                             mfu, mbu, overhead_s)


def replica_capacity(profile: Profile, input_len: int, output_len: int) -> float:
    """Requests/s one replica could serve at best: steady full steps of ``B`` decodes (the batch
    limit, or what the KV cache holds) that also prefill the ``B / output_len`` prompts admitted
    per step (within the token budget). An optimistic bound used to start the fleet search,
    not a prediction."""
    from fleetlm.sim.step_model import StepShape, chunk_pairs

    e = profile.engine
    per_seq_blocks = math.ceil((input_len + output_len) / e.block_size)
    batch = max(1, min(e.max_num_seqs, e.num_blocks // per_seq_blocks))
    batch = max(1, min(batch, int(e.max_num_batched_tokens / (1 + input_len / output_len))))
    admitted = batch / output_len
    ctx = input_len + output_len // 2
    prefill = admitted * input_len
    shape = StepShape(round(batch + prefill), batch, batch * ctx, round(admitted * chunk_pairs(0, input_len)),
                      round(batch * ctx + 2 * prefill), batch)
    return admitted / profile.step_time(shape)
