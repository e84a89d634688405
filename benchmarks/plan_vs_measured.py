"""Planner prediction vs fleetlm's measured decode-step and prefill time, SmolLM2-135M on this CPU.

1. Probe the machine: read bandwidth (256 MiB fp32 sum), bf16 matmul FLOP/s, bf16 GEMV rate.
2. Predict with the roofline (``fleetlm.plan``) from the probed bandwidth and FLOP/s.
3. Measure with the offline engine: prefill of N tokens = ``generate(max_tokens=1)``; decode step
   at batch B = ``(time(max_tokens=1+M) - time(max_tokens=1)) / M``; median of ``--reps`` runs,
   fresh random prompts each run (fixed seed), prefix caching off.

    python benchmarks/plan_vs_measured.py                 # probe + predict + measure
    python benchmarks/plan_vs_measured.py --probe-only    # no engine needed
    python benchmarks/plan_vs_measured.py --json out.json

Ratios are measured / predicted: 1.0 means the roofline is exact, > 1 the engine is slower.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import replace

from fleetlm.plan.formats import weight_format
from fleetlm.plan.hardware import get_hardware
from fleetlm.plan.model_load import load_model_spec
from fleetlm.plan.probe import probe
from fleetlm.plan.roofline import Machine, step_cost
from fleetlm.plan.workload import Layout

MODEL = "smollm2-135m-instruct"
SEED = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32, help="M decode steps timed")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--probe-only", action="store_true")
    p.add_argument("--breakdown", action="store_true",
                   help="also profile one decode run per batch: where the step time goes")
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


def predictions(probed, batches: list[int], n: int, m: int) -> dict[int, dict[str, float]]:
    spec = load_model_spec(MODEL)
    hw = get_hardware("cpu", mem_bandwidth=probed.mem_bandwidth, peak_flops=probed.peak_flops)
    mc = Machine(spec, weight_format("bf16"), "bf16", hw, Layout())
    mc_gemv = replace(mc, hw=replace(hw, mem_bandwidth=probed.gemv_bandwidth))
    out = {}
    for b in batches:
        pre = step_cost(mc, "prefill", b, n, n)
        dec = step_cost(mc, "decode", b, 1, n + m // 2)
        out[b] = {"prefill_s": pre.time_s, "prefill_bound": pre.bound, "decode_s": dec.time_s,
                  "decode_bound": dec.bound, "decode_intensity": dec.intensity,
                  "decode_gemv_bw_s": step_cost(mc_gemv, "decode", b, 1, n + m // 2).time_s}
    return out


def measure(batches: list[int], n: int, m: int, reps: int, threads: int,
            with_breakdown: bool) -> dict[int, dict]:
    from fleetlm import LLM, SamplingParams

    llm = LLM(MODEL, dtype="bfloat16", enable_prefix_caching=False, num_threads=threads,
              seed=SEED)
    rng = random.Random(SEED)

    def timed(b: int, max_tokens: int) -> float:
        batch = [{"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(n)]} for _ in range(b)]
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        t0 = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return elapsed

    timed(1, 4)  # warm-up: first-call allocations, kernel selection
    out = {}
    for b in batches:
        t1 = statistics.median(timed(b, 1) for _ in range(reps))
        tm = statistics.median(timed(b, 1 + m) for _ in range(reps))
        out[b] = {"prefill_s": t1, "decode_s": (tm - t1) / m}
        if with_breakdown:
            batch = [{"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(n)]}
                     for _ in range(b)]
            out[b]["decode_breakdown_s"] = breakdown(llm, batch, m)
        print(f"  measured B={b}: prefill {t1 * 1e3:.1f} ms, decode step {out[b]['decode_s'] * 1e3:.2f} ms",
              file=sys.stderr, flush=True)
    return out


GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
          "attention": ("aten::index", "aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_attention_math", "aten::index_copy_",
                        "aten::index_select")}


def matmul_floor(batches: list[int], reps: int = 3) -> dict[int, float]:
    """Time of SmolLM2's 211 linear layers (30 x 7 block matrices + the LM head) called with
    ``F.linear`` on a [B, d] bf16 input, best of ``reps``: the matmul time of one decode step that
    torch's CPU kernels allow, whatever the engine around them does."""
    import torch
    import torch.nn.functional as F

    spec = load_model_spec(MODEL)
    h, i, kv = spec.hidden_size, spec.intermediate_size, spec.num_kv_heads * spec.head_dim
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * spec.num_layers
    shapes.append((spec.vocab_size, h))
    gen = torch.Generator().manual_seed(SEED)
    out = {}
    with torch.inference_mode():
        weights = [torch.randn(o, k, generator=gen, dtype=torch.bfloat16) for o, k in shapes]
        for b in batches:
            xs = {k: torch.randn(b, k, generator=gen, dtype=torch.bfloat16) for k in (h, i)}

            def step(xs: dict = xs) -> None:
                for w in weights:
                    F.linear(xs[w.shape[1]], w)

            out[b] = _best(step, reps)
    return out


def _best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def breakdown(llm, batch: list[dict], m: int) -> dict[str, float]:
    """Per decode step: self-CPU time of matmuls, attention ops, other ops, and the rest of the
    wall time (Python, scheduler, sampler glue). From one profiled run; the profiler adds a few
    microseconds per op, so use it for proportions."""
    from torch.profiler import ProfilerActivity, profile

    from fleetlm import SamplingParams

    def run(max_tokens: int) -> tuple[float, dict[str, float]]:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            llm.generate(batch, params, use_tqdm=False)
            wall = time.perf_counter() - t0
        groups = dict.fromkeys((*GROUPS, "other ops"), 0.0)
        for ev in prof.key_averages():
            name = next((g for g, ops in GROUPS.items() if ev.key in ops), "other ops")
            groups[name] += ev.self_cpu_time_total / 1e6
        return wall, groups

    w1, g1 = run(1)
    wm, gm = run(1 + m)
    out = {k: (gm[k] - g1[k]) / m for k in gm}
    out["python + scheduler"] = (wm - w1) / m - sum(out.values())
    return out


def table(pred: dict, meas: dict | None, n: int) -> str:
    rows = ["| batch | phase | predicted | measured | measured / predicted | bound "
            "| predicted at GEMV rate | measured / that |", "|---|---|---|---|---|---|---|---|"]
    for b, p in pred.items():
        for phase, key in ((f"prefill {b}×{n} tok", "prefill_s"), ("decode step", "decode_s")):
            got = meas.get(b, {}).get(key) if meas else None
            bound = p["prefill_bound" if key == "prefill_s" else "decode_bound"]
            gemv = p.get("decode_gemv_bw_s") if key == "decode_s" else None
            rows.append(f"| {b} | {phase} | {_ms(p[key])} | {_ms(got)} | {_ratio(got, p[key])} | "
                        f"{bound} | {_ms(gemv)} | {_ratio(got, gemv)} |")
    return "\n".join(rows)


def _ms(s: float | None) -> str:
    return f"{s * 1e3:.2f} ms" if s else "—"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "—"


def breakdown_table(pred: dict, meas: dict) -> str:
    keys = [*GROUPS, "other ops", "python + scheduler"]
    rows = ["| batch | predicted (roofline / at GEMV rate) | measured | torch matmul floor | "
            + " | ".join(keys) + " |", "|---|---|---|---|" + "---|" * len(keys)]
    for b, got in meas.items():
        parts = got["decode_breakdown_s"]
        cells = " | ".join(f"{parts[k] * 1e3:.1f} ms" for k in keys)
        rows.append(f"| {b} | {pred[b]['decode_s'] * 1e3:.1f} / {pred[b]['decode_gemv_bw_s'] * 1e3:.1f} ms"
                    f" | {got['decode_s'] * 1e3:.1f} ms | {got['matmul_floor_s'] * 1e3:.1f} ms | {cells} |")
    return "\n".join(rows)


def main() -> int:
    args = parse_args()
    import torch

    random.seed(SEED)
    torch.manual_seed(SEED)
    threads = args.threads or torch.get_num_threads()
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes skew CPU timings)")
    probed = probe(threads=threads)
    print(f"probe ({threads} threads): read {probed.mem_bandwidth / 1e9:.1f} GB/s, bf16 matmul "
          f"{probed.peak_flops / 1e9:.0f} GFLOP/s, bf16 GEMV {probed.gemv_bandwidth / 1e9:.1f} GB/s")
    pred = predictions(probed, args.batches, args.prompt_len, args.decode_tokens)
    meas = None
    if not args.probe_only:
        try:
            meas = measure(args.batches, args.prompt_len, args.decode_tokens, args.reps, threads,
                           args.breakdown)
        except ImportError as e:
            print(f"engine not available ({e}); predictions only", file=sys.stderr)
    print(table(pred, meas, args.prompt_len))
    if meas and args.breakdown:
        for b, t in matmul_floor(args.batches).items():
            meas[b]["matmul_floor_s"] = t
        print(breakdown_table(pred, meas))
    if args.json:
        result = {"machine": platform.processor() or platform.machine(), "threads": threads,
                  "loadavg_after": os.getloadavg(),
                  "probe": probed.as_dict(), "prompt_len": args.prompt_len,
                  "decode_tokens": args.decode_tokens, "predicted": pred, "measured": meas}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
