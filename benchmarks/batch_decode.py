"""Batch decode in one loaded engine (issue 17): N prompts x 192 greedy tokens, tok/s and the
decode step. With ``--int4-q8-rows A,B`` the int4 x int8 kernel's row threshold is patched
between runs (the kernel below it), as RESULTS.md's threshold table was measured.

    python benchmarks/batch_decode.py --prompts 16 --int4-q8-rows 16,17      # shipped GGUF
    python benchmarks/batch_decode.py --prompts 16 --quantization dequantize # bf16
    FLEETLM_PREPACK=0 python benchmarks/batch_decode.py --prompts 16 --quantization dequantize
"""

from __future__ import annotations

import argparse
import time

from fleetlm import LLM, SamplingParams  # before torch: fleetlm's OpenMP settings apply


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=192)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--int4-q8-rows", default="", help="comma-separated thresholds to compare")
    args = ap.parse_args()
    import fleetlm.quantization.int4 as int4

    kw = {"quantization": args.quantization} if args.quantization else {}
    llm = LLM("smollm2-135m-instruct", dtype="bfloat16", kv_cache_memory=1 << 30, **kw)
    prompts = [f"Write a long story about a lighthouse keeper number {i}." for i in range(args.prompts)]
    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
    for rows in [int(r) for r in args.int4_q8_rows.split(",") if r] or [int4.INT4_Q8_ROWS]:
        int4.INT4_Q8_ROWS = rows
        start = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        elapsed = time.perf_counter() - start
        m = outs[0].metrics
        step = 1e3 * (m.finished_time - m.first_token_time) / (args.output_len - 1)
        print(f"INT4_Q8_ROWS={rows}: {len(prompts) * args.output_len / elapsed:.1f} tok/s, decode step {step:.1f} ms",
              flush=True)


if __name__ == "__main__":
    main()
