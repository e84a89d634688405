"""Batch-1 decode tok/s per weight format vs bf16 (issue 14), in one process, one run.

    flock /tmp/fleetlm-bench.lock nice -n 0 python benchmarks/quant_decode.py --formats bf16,int8,int4

Each format: load SmolLM2-135M (the default GGUF), warm up, then decode ``--output-len`` tokens
from a short prompt at batch 1 (greedy, ignore_eos), ``--repeats`` times; the best run counts
(the machine is shared). ``gguf`` is the file as shipped (quantized tensors kept quantized);
``bf16`` dequantizes it to bf16 and ``int8`` / ``int4`` quantize that at load.
"""

from __future__ import annotations

import argparse
import json
import os

from fleetlm import LLM, SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def engine_kwargs(fmt: str) -> dict:
    kw = {"dtype": "bfloat16", "kv_cache_memory": 256 << 20, "max_num_seqs": 1}
    if fmt != "gguf":
        kw["quantization"] = "dequantize" if fmt == "bf16" else fmt
    return kw


def decode_tok_s(llm: LLM, output_len: int, repeats: int) -> float:
    sp = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(repeats):
        m = llm.generate([PROMPT], sp, use_tqdm=False)[0].metrics
        best = max(best, (output_len - 1) / (m.finished_time - m.first_token_time))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = {}
    for fmt in args.formats.split(","):
        llm = LLM(args.model, **engine_kwargs(fmt))
        results[fmt] = decode_tok_s(llm, args.output_len, args.repeats)
        print(f"{fmt}: {results[fmt]:.1f} tok/s", flush=True)
        del llm
    base = results.get("bf16")
    if base:
        for fmt, v in results.items():
            print(f"{fmt}: {v / base:.2f}x bf16")
    load = os.getloadavg()[0]
    print(f"1-min load at end: {load:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tok_s": results, "load_1min": load, "output_len": args.output_len}, f, indent=1)


if __name__ == "__main__":
    main()
