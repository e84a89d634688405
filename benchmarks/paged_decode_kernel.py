"""The compiled paged decode attention kernel on its own (issue 17): microseconds a call for
SmolLM2's head shapes (9 query heads, 3 KV heads of 64, bf16, blocks of 16 scattered through a
9.8 MiB cache), per batch size and context length, and the bytes of K/V it reads per second.

    python benchmarks/paged_decode_kernel.py [--threads 2]

Run it from two checkouts (``git worktree``, ``PYTHONPATH`` set to each, and a separate
``TORCH_EXTENSIONS_DIR`` per checkout so the builds do not overwrite each other) to compare
kernels; each result is checked against float64 attention first.
"""

from __future__ import annotations

import argparse
import time

import fleetlm  # noqa: F401  - before torch: fleetlm's OpenMP settings apply

CASES = ((1, 128), (1, 600), (1, 2000), (4, 600), (16, 600), (64, 320))


def main() -> None:
    import torch

    from fleetlm.ops import cpu_ops

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernel = cpu_ops()
    g = torch.Generator().manual_seed(0)
    nb, bs, hkv, d, h = 1600, 16, 3, 64, 9
    kv = torch.randn(2, nb, bs, hkv, d, generator=g).bfloat16()
    for b, length in CASES:
        q = torch.randn(b, h, d, generator=g).bfloat16()
        width = -(-length // bs)
        table = torch.stack([torch.randperm(nb, generator=g)[:width] for _ in range(b)])
        lens = torch.full((b,), length, dtype=torch.long)
        out = kernel.paged_decode(q, kv, table, lens, d**-0.5)
        k = kv[0][table].reshape(b, -1, hkv, d)[:, :length].transpose(1, 2).double()
        v = kv[1][table].reshape(b, -1, hkv, d)[:, :length].transpose(1, 2).double()
        ref = torch.nn.functional.scaled_dot_product_attention(q.double().view(b, hkv, h // hkv, d), k, v)
        err = (out.double() - ref.reshape(b, h, d)).abs().max().item()
        reps = max(20, 20000 // (b * length // 16 + 1))
        start = time.perf_counter()
        for _ in range(reps):
            kernel.paged_decode(q, kv, table, lens, d**-0.5)
        dt = (time.perf_counter() - start) / reps
        gbs = b * length * hkv * d * 2 * 2 / dt / 1e9
        print(f"batch {b:3d} context {length:5d}: {dt * 1e6:8.1f} us, K/V read {gbs:5.1f} GB/s, max error {err:.1e}")


if __name__ == "__main__":
    main()
