"""Offline throughput per weight format (issue 14): 64 random prompts x 256 tokens in, 128 out.

    flock /tmp/fleetlm-bench.lock nice -n 0 python benchmarks/quant_throughput.py --formats bf16,w8a8

Output tokens per second of one ``LLM.generate`` over the whole batch (greedy, ignore_eos),
SmolLM2-135M; formats run in turn, ``--repeats`` rounds, best run per format. Fresh random
prompts per run (no prefix-cache reuse between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from fleetlm import LLM, SamplingParams
from fleetlm.quantization.w8a8 import int8_matrix_units


def engine_kwargs(fmt: str) -> dict:
    kw = {"dtype": "bfloat16", "kv_cache_memory": 1 << 30}
    if fmt != "gguf":
        kw["quantization"] = "dequantize" if fmt == "bf16" else fmt
    return kw


def run_once(llm: LLM, n: int, input_len: int, output_len: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    prompts = [{"prompt_token_ids": rng.integers(100, 40000, input_len).tolist()} for _ in range(n)]
    sp = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--formats", default="bf16,w8a8")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fmts = args.formats.split(",")
    llms = {f: LLM(args.model, **engine_kwargs(f)) for f in fmts}
    runs: dict[str, list[float]] = {f: [] for f in fmts}
    for r in range(args.repeats):
        for i, f in enumerate(fmts):
            runs[f].append(run_once(llms[f], args.num_prompts, args.input_len, args.output_len, seed=100 * r + i))
            print(f"{f} run {r}: {runs[f][-1]:.1f} output tok/s", flush=True)
    best = {f: max(v) for f, v in runs.items()}
    for f in fmts:
        print(f"{f}: {best[f]:.1f} output tok/s ({best[f] / best[fmts[0]]:.2f}x {fmts[0]})")
    load = os.getloadavg()[0]
    print(f"int8 units: {', '.join(int8_matrix_units()) or 'none'}; 1-min load at end: {load:.2f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"output_tok_s": best, "runs": runs, "load_1min": load,
                       "int8_units": list(int8_matrix_units())}, fh, indent=1)


if __name__ == "__main__":
    main()
