"""Bandwidth of one decode token's matrices on their own (issue 17): SmolLM2-shaped layers
(30 x qkv, o, gate_up, down), each multiplied by one row in turn, so every matrix comes from
beyond L2 as in decode: torch's int4 pack kernel, fleetlm's int4 x int8 kernel (AVX512-VNNI
machines; its bytes are the nibbles plus fp16 scales and minimums) and fleetlm's bf16 GEMV, then a
streaming read (``torch.sum`` over 256 MiB), on 1 and 2 threads.

    python benchmarks/gemv_stream.py
"""

from __future__ import annotations

import time

import fleetlm  # noqa: F401  (imported before torch, in main: fleetlm's OpenMP settings apply)

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [N, K] of qkv, o, gate_up, down
LAYERS = 30


def best_ms(f, n: int = 10) -> float:
    f()
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    import torch

    from fleetlm.ops import cpu_ops
    from fleetlm.quantization.int4 import quantize_int4_groups

    torch.manual_seed(0)
    ops = cpu_ops()
    layers = []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            w = torch.randn(n, k)
            q, s, z = quantize_int4_groups(w, 32)
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
            sz = torch.stack([s.t(), z.t()], -1).bfloat16().contiguous()
            nib = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
            q8 = (nib, s.half().contiguous(), (z - 8 * s).half().contiguous())
            layers.append((packed, sz, w.bfloat16(), k, q8))
    xs = {k: torch.randn(1, k).bfloat16() for k in (576, 1536)}

    def run_int4() -> None:
        for packed, sz, _, k, _ in layers:
            torch._weight_int4pack_mm_for_cpu(xs[k], packed, 32, sz)

    def run_q8() -> None:
        for *_, k, (nib, sc, mn) in layers:
            ops.int4_q8_linear(xs[k], nib, sc, mn, 32)

    def run_bf16() -> None:
        for _, _, w, k, _ in layers:
            ops.bf16_gemv(xs[k], w, None)

    int4_mb = sum(p.numel() * p.element_size() for p, *_ in layers) / 1e6
    q8_mb = sum(sum(t.numel() * t.element_size() for t in q8) for *_, q8 in layers) / 1e6
    bf16_mb = sum(w.numel() * 2 for _, _, w, _, _ in layers) / 1e6
    vnni = ops.q8_isa() == "avx512vnni"
    big = torch.empty(256 << 20, dtype=torch.uint8).random_().view(torch.float32)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        a, b, c = best_ms(run_int4), best_ms(run_bf16), best_ms(lambda: big.sum(), 5)
        d = best_ms(run_q8) if vnni else float("nan")
        print(f"threads {threads}: int4 pack {a:.2f} ms ({int4_mb / a:.1f} GB/s, {a / len(layers) * 1e3:.0f} us a call), "
              f"int4 x int8 {d:.2f} ms ({q8_mb / d:.1f} GB/s), "
              f"bf16 GEMV {b:.2f} ms ({bf16_mb / b:.1f} GB/s), streaming read {256 * 1.048576 / c:.1f} GB/s")


if __name__ == "__main__":
    main()
