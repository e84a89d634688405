"""Quantized matmuls by the number of input rows (issue 17): where each path wins.

- SmolLM2's Q8_0 head (49152 x 576): the group-wise int8 kernel (fp32 activations), the int8 x int8
  kernel (``int8_q8_linear``, bf16 activations rounded to int8; AVX512-VNNI machines only), and the
  bf16 GEMM on a dense copy (what a tied head reads from its embedding table).
- int4 g32 [3072, 576] and [576, 1536] (gate/up and down): torch's packed kernel, the int4 x int8
  kernel (``int4_q8_linear``, AVX512-VNNI machines only), and the compiled dequantization followed
  by the bf16 GEMM.

    python benchmarks/quant_rows.py

Milliseconds a call (best of 5 after a warm-up), random codes and scales, fixed seed.
"""

from __future__ import annotations

import time

import fleetlm  # noqa: F401  - before torch: fleetlm's OpenMP settings apply

ROWS = (1, 2, 4, 8, 16, 32, 64)


def best_ms(f, *args, reps: int = 5) -> float:
    f(*args)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    import torch
    import torch.nn.functional as F

    from fleetlm.ops import cpu_ops
    from fleetlm.quantization.int4 import Int4LinearMethod

    k = cpu_ops()
    g = torch.Generator().manual_seed(0)
    n, kk = 49152, 576
    q = torch.randint(-127, 128, (n, kk), dtype=torch.int8, generator=g)
    s = torch.rand(n, kk // 32, generator=g) * 0.01
    dense = k.int8_group_dequant(q, s, 32, torch.bfloat16)
    vnni = k.q8_isa() == "avx512vnni"
    print("Q8_0 head 49152 x 576: rows, int8 kernel ms, int8 x int8 kernel ms"
          f"{'' if vnni else ' (no VNNI: not run)'}, bf16 GEMM on the dense table ms")
    for m in ROWS:
        x = torch.randn(m, kk, generator=g).bfloat16()
        q8 = best_ms(k.int8_q8_linear, x, q, s, 32) if vnni else float("nan")
        print(f"  {m:3d} {best_ms(k.int8_group_linear, x.float(), q, s, 32):8.2f} {q8:8.2f} "
              f"{best_ms(F.linear, x, dense):8.2f}")
    for n, kk in ((3072, 576), (576, 1536)):
        layer, method = torch.nn.Module(), Int4LinearMethod(32)
        method.create_weights(layer, kk, n, torch.bfloat16)
        layer.weight.data.copy_(torch.randn(n, kk, generator=g) * 0.05)
        method.process_weights_after_loading(layer)
        codes = torch.stack([layer.nibbles & 0x0F, layer.nibbles >> 4], dim=-1).reshape(n, kk)
        packed_w = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
        print(f"int4 g32 {n} x {kk}: rows, packed kernel ms, int4 x int8 kernel ms"
              f"{'' if vnni else ' (no VNNI: not run)'}, dequantize + bf16 GEMM ms")
        for m in ROWS:
            x = torch.randn(m, kk, generator=g).bfloat16()
            packed = best_ms(torch._weight_int4pack_mm_for_cpu, x, packed_w, 32, layer.scales_zeros)
            q8 = best_ms(k.int4_q8_linear, x, layer.nibbles, layer.q8_scales, layer.q8_mins, 32) if vnni else float("nan")
            gemm = best_ms(lambda x, w: F.linear(x, k.int4_dequant(w.nibbles, w.scales_zeros, 32, torch.bfloat16)),
                           x, layer)
            print(f"  {m:3d} {packed:8.2f} {q8:8.2f} {gemm:8.2f}")


if __name__ == "__main__":
    main()
