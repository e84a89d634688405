"""``fleetlm plan --disagg``: prefill and decode worker counts for a request rate and SLOs.

Arithmetic on the roofline of one worker (``roofline.step_cost``), for ``rate`` requests/s of
``input_len`` prompt and ``output_len`` output tokens, Poisson arrivals:

- **Prefill workers.** A worker prefills one prompt in ``S`` seconds; with ``P`` workers each
  sees ``rate / P`` and is an M/D/1 queue, ``rho = rate * S / P``, mean wait
  ``rho * S / (2 (1 - rho))``. TTFT = wait + ``S`` + KV transfer + one decode step on the decode
  worker. ``P`` is the smallest count whose TTFT meets the TTFT SLO (and ``rho < 1``).
- **KV transfer.** ``latency + input_len * kv_bytes_per_token / bandwidth``, the bandwidth from
  the transport (``kv_link``): across GPU hosts the NIC; between workers on one CPU host, ``tcp``
  and ``torch_distributed`` at the loopback TCP rate the probe measured (``--probe``; the CPU
  entry's ``network_bw`` holds it) into a fresh receive buffer (its pages faulted in at the
  probed ``page_fault_bw``) then one copy into the paged cache; ``shm`` the segment's pages
  faulted in and one copy; an unprobed CPU host the memory copies on the data path, each at
  ``mem_bandwidth / 2`` (a copy reads and writes).
- **Decode workers.** By Little's law ``rate * (output_len - 1) * TPOT`` sequences decode at
  once; ``D`` workers hold ``b`` of them each, and a step over ``b`` sequences at the mean
  context takes ``t(b)`` = the TPOT. ``D`` is the smallest count whose ``t(b)`` meets the TPOT
  SLO with ``b`` sequences' KV fitting a worker's memory.

The SLOs are met on the mean (the queue's tail is not modelled): ``fleetlm plan --fleet --pd
P:D`` simulates a split with the engine's scheduler for percentiles.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fleetlm.plan.errors import PlanError
from fleetlm.plan.hardware import CPU_NETWORK_BW, HardwareSpec
from fleetlm.plan.memory import kv_bytes_per_token, memory_plan
from fleetlm.plan.model_spec import ModelSpec
from fleetlm.plan.roofline import Machine, step_cost
from fleetlm.plan.workload import Layout, Workload

# data-path memory copies on one host: tcp = into and out of the kernel's socket buffers (the
# producer's frame and the consumer's receive are zero-copy); torch_distributed (gloo) = the
# same over its TCP pairs; shm = the consumer's copy out of the shared segment
HOST_COPIES = {"tcp": 2, "torch_distributed": 2, "shm": 1}
TRANSPORTS = ("tcp", "shm", "torch_distributed", "nccl")
MAX_WORKERS = 100_000


@dataclass(frozen=True)
class KVLink:
    transport: str
    bandwidth: float  # bytes/s
    latency_s: float
    how: str


def kv_link(transport: str, hw: HardwareSpec, bandwidth: float | None = None,
            latency_s: float | None = None) -> KVLink:
    """The KV path between a prefill and a decode worker of ``hw``: a CPU machine (or ``shm``)
    moves KV through host memory on one host; GPU workers on separate hosts through the NIC
    (``nccl``: NVLink when both sit in one node)."""
    if transport not in TRANSPORTS:
        raise PlanError(f"--kv-transport {transport!r} is not known; accepted values: {', '.join(TRANSPORTS)}")
    if transport == "nccl" and hw.is_cpu:
        raise PlanError("--kv-transport nccl moves KV between GPUs; a CPU machine uses tcp, shm or torch_distributed")
    lat = latency_s if latency_s is not None else 50e-6
    if bandwidth is not None:
        return KVLink(transport, bandwidth, lat, "given (--kv-bandwidth)")
    fault = 1 / hw.page_fault_bw if hw.page_fault_bw else 0.0  # seconds per byte landing in fresh pages
    if hw.is_cpu and transport != "shm" and hw.network_bw and hw.network_bw != CPU_NETWORK_BW:
        copy = hw.mem_bandwidth / 2
        return KVLink(transport, 1 / (1 / hw.network_bw + fault + 1 / copy), lat,
                      "loopback TCP (probed) into a fresh buffer, then one copy into the cache")
    if transport == "shm" or hw.is_cpu:
        copies = HOST_COPIES[transport]
        if transport == "shm" and fault:
            return KVLink(transport, 1 / (1 / (hw.mem_bandwidth / 2) + fault), lat,
                          "the segment's pages faulted in (probed), one copy out of it")
        return KVLink(transport, hw.mem_bandwidth / 2 / copies, lat,
                      f"{copies} host memory cop{'y' if copies == 1 else 'ies'} at mem_bandwidth / 2")
    if transport == "nccl" and hw.interconnect_bw:
        return KVLink(transport, hw.interconnect_bw, lat, "NVLink-class link inside a node")
    if not hw.network_bw:
        raise PlanError(f"{hw.name} has no network bandwidth in the catalog; give --kv-bandwidth")
    return KVLink(transport, hw.network_bw, lat, "the NIC between hosts")


@dataclass(frozen=True)
class PDPlan:
    prefill_workers: int
    decode_workers: int
    gpus_per_worker: int
    prefill_s: float  # one prompt on one prefill worker
    prefill_utilization: float
    queue_wait_s: float
    transfer_s: float
    kv_bytes_per_request: int
    link: KVLink
    decode_batch: float  # sequences per decode worker
    max_decode_batch: int  # what one decode worker's memory holds
    tpot_s: float
    ttft_s: float
    reasons: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def plan_pd(m: ModelSpec, hw: HardwareSpec, fmt, *, rate: float, input_len: int, output_len: int,
            ttft_slo_s: float, tpot_slo_s: float, link: KVLink, tp: int = 1, kv_dtype: str = "bf16",
            memory_utilization: float = 0.9) -> PDPlan:
    if not (rate > 0 and math.isfinite(rate)):
        raise PlanError(f"the request rate must be a finite number > 0, got {rate}")
    if input_len < 1 or output_len < 2:
        raise PlanError(f"P/D needs --input-len >= 1 and --output-len >= 2, got {input_len} / {output_len}")
    lay = Layout(tp=tp)
    mc = Machine(m, fmt, kv_dtype, hw, lay)
    w = Workload(context=input_len + output_len, concurrency=1, output_len=output_len, input_len=input_len,
                 kv_dtype=kv_dtype, max_batched_tokens=max(input_len, 256), memory_utilization=memory_utilization)
    max_batch = memory_plan(m, fmt, hw, lay, w).max_seqs_per_replica
    if max_batch < 1:
        raise PlanError(f"{m.name} with one {input_len + output_len}-token sequence does not fit a "
                        f"TP={tp} worker of {hw.name}; raise --tp")
    kv_bytes = input_len * kv_bytes_per_token(m, kv_dtype)
    transfer = link.latency_s + kv_bytes / link.bandwidth
    reasons = []
    decode_workers, batch, tpot = _decode(mc, w, rate, output_len, tpot_slo_s, max_batch, reasons)
    first_step = step_cost(mc, "decode", max(1, math.ceil(batch)), 1, input_len).time_s
    s = step_cost(mc, "prefill", 1, input_len, input_len).time_s
    fixed = s + transfer + first_step
    if fixed > ttft_slo_s:
        raise PlanError(f"the TTFT SLO {ttft_slo_s * 1e3:,.0f} ms is below one prefill ({s * 1e3:,.1f} ms) + "
                        f"KV transfer ({transfer * 1e3:,.1f} ms) + one decode step ({first_step * 1e3:,.1f} ms) "
                        f"= {fixed * 1e3:,.1f} ms even without queueing; raise --tp or the SLO")
    prefill_workers = max(1, math.floor(rate * s) + 1)
    while _wait(rate * s / prefill_workers, s) + fixed > ttft_slo_s:
        prefill_workers += 1
        if prefill_workers > MAX_WORKERS:
            raise PlanError(f"no prefill worker count up to {MAX_WORKERS:,} meets the TTFT SLO")
    rho = rate * s / prefill_workers
    wait = _wait(rho, s)
    reasons.append(f"prefill: {prefill_workers} workers at {rho:.0%} busy, mean queue wait "
                   f"{wait * 1e3:,.1f} ms; TTFT = wait + prefill {s * 1e3:,.1f} ms + transfer "
                   f"{transfer * 1e3:,.1f} ms + first step {first_step * 1e3:,.1f} ms")
    return PDPlan(prefill_workers, decode_workers, tp, s, rho, wait, transfer, kv_bytes, link, batch,
                  max_batch, tpot, wait + fixed, tuple(reasons))


def _wait(rho: float, service_s: float) -> float:
    """Mean M/D/1 queue wait."""
    return math.inf if rho >= 1 else rho * service_s / (2 * (1 - rho))


def _decode(mc: Machine, w: Workload, rate: float, output_len: int, tpot_slo_s: float, max_batch: int,
            reasons: list[str]) -> tuple[int, float, float]:
    ctx = w.decode_context
    one = step_cost(mc, "decode", 1, 1, ctx).time_s
    if one > tpot_slo_s:
        raise PlanError(f"the TPOT SLO {tpot_slo_s * 1e3:,.1f} ms is below one decode step at batch 1 "
                        f"({one * 1e3:,.1f} ms); raise --tp or the SLO")
    # the largest batch whose step meets the TPOT SLO (step time grows with the batch)
    lo, hi = 1, max_batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if step_cost(mc, "decode", mid, 1, ctx).time_s <= tpot_slo_s else (lo, mid - 1)
    b_max = lo

    def settle(workers: int) -> tuple[float, float]:
        """Little's law at the TPOT the batch gives: the fixed point, iterated from the SLO."""
        batch, tpot = 0.0, tpot_slo_s
        for _ in range(50):
            batch = min(rate * (output_len - 1) * tpot / workers, 8.0 * b_max)
            tpot = step_cost(mc, "decode", max(1, math.ceil(batch)), 1, ctx).time_s
        return batch, tpot

    def meets(workers: int) -> bool:
        batch, tpot = settle(workers)
        return batch <= b_max and tpot <= tpot_slo_s

    hi = 1  # more workers, smaller batches, shorter steps: feasibility is monotone
    while not meets(hi):
        hi *= 2
        if hi > MAX_WORKERS:
            raise PlanError(f"no decode worker count up to {MAX_WORKERS:,} meets the TPOT SLO")
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if meets(mid) else (mid + 1, hi)
    workers = lo
    batch, tpot = settle(workers)
    why = "memory" if b_max == max_batch else "the TPOT SLO"
    reasons.append(f"decode: {workers} workers of {batch:,.1f} sequences each (at most {b_max:,} by {why}), "
                   f"TPOT {tpot * 1e3:,.1f} ms")
    return workers, batch, tpot
