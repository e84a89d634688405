"""Measure this machine's memory bandwidth and matmul FLOP/s (a short probe, needs torch).

* ``mem_bandwidth``: reading a 256 MiB fp32 tensor (``x.sum()``), far larger than any cache;
  the best of a few runs, the way STREAM reports.
* ``peak_flops``: a bf16 2048^3 matmul (the dtype the engine computes in), best of a few runs.
* ``gemv_bandwidth``: a bf16 matrix-vector product over a 128 MiB matrix, i.e. the rate at
  which the decode kernels actually stream weights (can be below ``mem_bandwidth`` on CPUs
  whose bf16 GEMV is compute-limited).
* ``tcp_bandwidth``: 64 MiB over a loopback TCP connection (a sending thread, 1 MiB writes,
  ``recv_into`` a preallocated buffer): the link between two workers on this host.
* ``fault_bandwidth``: bytes/s of first-touching freshly allocated memory (one page fault, and
  the kernel zeroing the page, per 4 KiB): what a receive into a new buffer pays on top.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ProbeResult:
    mem_bandwidth: float
    peak_flops: float
    gemv_bandwidth: float
    threads: int
    tcp_bandwidth: float = 0.0
    fault_bandwidth: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _best(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _read_bandwidth(torch, reps: int) -> float:
    big = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB, far beyond any cache
    return big.numel() * 4 / _best(lambda: big.sum(), reps)


def _matmul_flops(torch, reps: int, n: int = 2048) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    return 2 * n**3 / _best(lambda: a @ b, reps)


def _gemv_bandwidth(torch, reps: int) -> float:
    w = torch.randn(8192, 8192, dtype=torch.bfloat16)  # 128 MiB
    v = torch.randn(8192, 1, dtype=torch.bfloat16)
    return w.numel() * 2 / _best(lambda: w @ v, reps)


def tcp_loopback_bandwidth(nbytes: int = 64 << 20, reps: int = 3) -> float:
    """Bytes/s through one loopback TCP connection, best of ``reps``."""
    chunk = b"\0" * (1 << 20)
    buf = bytearray(nbytes)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]

        def send() -> None:
            with socket.create_connection(("127.0.0.1", port)) as s:
                for _ in range(reps * (nbytes // len(chunk))):
                    s.sendall(chunk)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        conn, _ = srv.accept()
        best = float("inf")
        with conn:
            view = memoryview(buf)
            for _ in range(reps):
                got, t0 = 0, time.perf_counter()
                while got < nbytes:
                    n = conn.recv_into(view[got:], nbytes - got)
                    if n == 0:
                        raise RuntimeError("loopback TCP probe: the sender closed early")
                    got += n
                best = min(best, time.perf_counter() - t0)
        sender.join()
    return nbytes / best


def fault_bandwidth(torch, nbytes: int = 64 << 20, reps: int = 3) -> float:
    """Bytes/s of touching every page of a fresh allocation, best of ``reps``."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x = torch.empty(nbytes, dtype=torch.uint8)
        x[::4096] = 1
        best = min(best, time.perf_counter() - t0)
        del x
    return nbytes / best


def probe(reps: int = 5, threads: int | None = None) -> ProbeResult:
    """Run the four measurements (about 3 s) with ``threads`` torch threads."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    with torch.inference_mode():
        bandwidth = _read_bandwidth(torch, reps)
        flops = _matmul_flops(torch, reps)
        gemv = _gemv_bandwidth(torch, reps)
        faults = fault_bandwidth(torch)
    return ProbeResult(bandwidth, flops, gemv, torch.get_num_threads(), tcp_loopback_bandwidth(), faults)
