"""Accelerators the planner knows, and a custom / CPU entry.

All FLOP/s are *dense* (no 2:4 sparsity) peak tensor-core figures from the vendors' datasheets;
bandwidths are bytes/s. ``interconnect_bw`` is the per-GPU, one-direction scale-up bandwidth
(NVLink / Infinity Fabric; datasheets quote both directions, e.g. H100 "900 GB/s" = 450 GB/s
each way), which is what a ring all-reduce moves data at. ``network_bw`` is the per-GPU
scale-out NIC (400 Gb/s NDR InfiniBand = 50 GB/s). ``memory_bytes`` is the capacity the driver
reports (what an engine can allocate), which is below the marketing "80 GB" on some parts.

Sources:
* A100-SXM4-80GB: NVIDIA A100 datasheet: 2,039 GB/s HBM2e, BF16 312 TFLOPS, no FP8,
  NVLink 600 GB/s; nvidia-smi reports 81,920 MiB.
* H100-SXM5: NVIDIA H100 datasheet: 3.35 TB/s HBM3, BF16 989.4 / FP8 1,978.9 TFLOPS dense,
  NVLink 900 GB/s; nvidia-smi reports 81,559 MiB.
* H200-SXM: NVIDIA H200 datasheet: 141 GB HBM3e (nvidia-smi 143,771 MiB), 4.8 TB/s,
  same compute and NVLink as H100.
* B200 (HGX B200): 180 GB HBM3e (nvidia-smi 183,359 MiB), 8 TB/s, BF16 2.25 / FP8 4.5 PFLOPS
  dense, NVLink 5 1.8 TB/s.
* MI300X: AMD Instinct MI300X datasheet: 192 GB HBM3, 5.3 TB/s, BF16 1,307.4 / FP8 2,614.9
  TFLOPS dense, 7 Infinity Fabric links of 64 GB/s each way (448 GB/s).
* L40S: NVIDIA L40S datasheet: 48 GB GDDR6 (nvidia-smi 46,068 MiB), 864 GB/s, BF16 362.05 /
  FP8 733 TFLOPS dense, no NVLink (PCIe Gen4 x16: 32 GB/s each way).
FP32 (non-tensor) peaks: A100 19.5, H100/H200 66.9, MI300X 163.4, L40S 91.6 TFLOPS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from fleetlm.plan.errors import PlanError, choices_error

CPU_NETWORK_BW = 10e9  # an unprobed CPU host's link to another: a placeholder (``--probe`` measures it)
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator (or one CPU socket) and the links between them."""

    name: str
    memory_bytes: int
    mem_bandwidth: float  # bytes/s
    peak_flops: dict[str, float]  # dense FLOP/s by compute precision: "bf16", "fp8", "fp32"
    interconnect_bw: float = 0.0  # bytes/s one way, per device, inside a node
    network_bw: float = 0.0  # bytes/s one way, per device, between nodes
    devices_per_node: int = 8
    collective_latency_s: float = 10e-6  # fixed cost of one small all-reduce (NCCL, NVLink)
    runtime_overhead_bytes: int = 1 * GiB  # CUDA context, cuBLAS/NCCL workspaces, graphs
    is_cpu: bool = False
    note: str = ""
    page_fault_bw: float = 0.0  # bytes/s of first-touching fresh memory (CPU, probed); 0: not modelled

    def flops_for(self, compute: str) -> tuple[float, str]:
        """Peak FLOP/s for ``compute``; falls back (fp8 -> bf16) when the part lacks it."""
        if compute in self.peak_flops:
            return self.peak_flops[compute], compute
        if compute == "fp8" and "bf16" in self.peak_flops:
            return self.peak_flops["bf16"], "bf16"
        if "bf16" in self.peak_flops:
            return self.peak_flops["bf16"], "bf16"
        key = next(iter(self.peak_flops))
        return self.peak_flops[key], key

    @property
    def ridge_intensity(self) -> float:
        """FLOP per byte at which bf16 math and memory take equal time."""
        return self.flops_for("bf16")[0] / self.mem_bandwidth


def _gpu(name: str, mib: int, tbs: float, bf16_tf: float, fp8_tf: float | None,
         fp32_tf: float | None, link_gbs: float, net_gbs: float = 50.0, note: str = "") -> HardwareSpec:
    flops = {"bf16": bf16_tf * 1e12}
    if fp8_tf:
        flops["fp8"] = fp8_tf * 1e12
    if fp32_tf:
        flops["fp32"] = fp32_tf * 1e12
    return HardwareSpec(name, mib * MiB, tbs * 1e12, flops, link_gbs * 1e9, net_gbs * 1e9,
                        note=note)


HARDWARE: dict[str, HardwareSpec] = {
    h.name: h
    for h in (
        _gpu("a100-80g", 81_920, 2.039, 312, None, 19.5, 300, 25, "no FP8: fp8 runs as bf16"),
        _gpu("h100-sxm", 81_559, 3.35, 989.4, 1978.9, 66.9, 450),
        _gpu("h200", 143_771, 4.8, 989.4, 1978.9, 66.9, 450),
        _gpu("b200", 183_359, 8.0, 2250, 4500, None, 900),
        _gpu("mi300x", 196_608, 5.3, 1307.4, 2614.9, 163.4, 448),
        _gpu("l40s", 46_068, 0.864, 362.05, 733, 91.6, 32, 25, "PCIe only: TP all-reduce is slow"),
    )
}
_ALIASES = {"a100": "a100-80g", "a100-sxm": "a100-80g", "h100": "h100-sxm", "h100-sxm5": "h100-sxm",
            "h200-sxm": "h200", "hgx-b200": "b200"}
CUSTOM = ("cpu", "custom")


def hardware_names() -> list[str]:
    return [*HARDWARE, *CUSTOM]


def system_memory_bytes() -> int:
    """Physical memory of this machine (Linux / macOS)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


def get_hardware(name: str, *, memory: float | None = None, mem_bandwidth: float | None = None,
                 peak_flops: float | None = None, interconnect_bw: float | None = None) -> HardwareSpec:
    """A catalog entry (with optional overrides) or a ``cpu`` / ``custom`` entry.

    ``cpu`` and ``custom`` need ``mem_bandwidth`` and ``peak_flops`` (measure them with
    ``fleetlm.plan.probe`` or a STREAM / GEMM benchmark); ``cpu`` defaults its memory to this
    machine's RAM, ``custom`` requires it.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key in CUSTOM:
        return _custom(key, memory, mem_bandwidth, peak_flops, interconnect_bw)
    if key not in HARDWARE:
        raise choices_error("hardware", name, hardware_names())
    hw = HARDWARE[key]
    changes: dict[str, object] = {}
    if memory is not None:
        changes["memory_bytes"] = int(memory)
    if mem_bandwidth is not None:
        changes["mem_bandwidth"] = float(mem_bandwidth)
    if peak_flops is not None:
        changes["peak_flops"] = {k: float(peak_flops) for k in hw.peak_flops}
    if interconnect_bw is not None:
        changes["interconnect_bw"] = float(interconnect_bw)
    return replace(hw, **changes) if changes else hw


def _custom(key: str, memory: float | None, bw: float | None, flops: float | None,
            link: float | None) -> HardwareSpec:
    missing = [flag for flag, v in (("--mem-bandwidth", bw), ("--peak-flops", flops)) if v is None]
    if key == "custom" and memory is None:
        missing.append("--memory")
    if missing:
        raise PlanError(f"--hardware {key} needs {', '.join(missing)} (bytes/s and FLOP/s, e.g. "
                        "--mem-bandwidth 40e9 --peak-flops 1e12; measure with --probe)")
    assert bw is not None and flops is not None
    if bw <= 0 or flops <= 0:
        raise PlanError("--mem-bandwidth and --peak-flops must be positive")
    mem = int(memory) if memory is not None else system_memory_bytes()
    is_cpu = key == "cpu"
    return HardwareSpec(
        name=key, memory_bytes=mem, mem_bandwidth=float(bw),
        peak_flops={"bf16": float(flops), "fp8": float(flops), "fp32": float(flops)},
        interconnect_bw=float(link) if link else (10e9 if is_cpu else 0.0),
        network_bw=CPU_NETWORK_BW if is_cpu else 0.0, devices_per_node=1 if is_cpu else 8,
        collective_latency_s=20e-6 if is_cpu else 10e-6,
        runtime_overhead_bytes=0 if is_cpu else 1 * GiB, is_cpu=is_cpu,
        note="user-supplied bandwidth and FLOP/s (same peak for every precision)",
    )
