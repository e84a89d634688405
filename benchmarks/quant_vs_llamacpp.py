"""Batch-1 decode against llama.cpp on the same GGUF files, in one run (issues 14 and 17).

    python benchmarks/quant_vs_llamacpp.py --llama-bench /path/to/llama-bench \\
        --files Q4_1=/path/SmolLM2-135M-Instruct.Q4_1.gguf,Q8_0=/path/SmolLM2.Q8_0.gguf \\
        --threads 1,2 --repeats 3 --out benchmarks/quant_vs_llamacpp.json

For every round, file and thread count: llama.cpp's ``llama-bench -p 0 -n 128`` (tg128: 128
tokens decoded from an empty context, its own timing), then fleetlm decoding 128 tokens at batch
1 from a short prompt (greedy, ignore_eos; tok/s from the first to the last token) with the same
number of threads, the file loaded as shipped (quantized tensors kept). Each engine runs alone
(llama-bench is a child process; fleetlm's engine is idle while it runs). A pair's best round
counts, for both engines alike. Build llama-bench as ../shared/PEERS.md says.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess

# fleetlm before torch (imported in main): its OpenMP settings apply (fleetlm/__init__.py)
from fleetlm import LLM, SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
OUTPUT_LEN = 128


def llama_bench_tg(exe: str, path: str, threads: int) -> float:
    # llama.cpp runs with its own OpenMP defaults, not the settings ``import fleetlm`` makes (with
    # OMP_WAIT_POLICY=PASSIVE inherited, its 2-thread tg128 fell from 84 to 23 tok/s)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    out = subprocess.run([exe, "-m", path, "-p", "0", "-n", str(OUTPUT_LEN), "-t", str(threads), "-r", "1",
                          "-o", "json"], check=True, capture_output=True, text=True, env=env).stdout
    rows = json.loads(out)
    return float(rows[0]["avg_ts"])


def fleetlm_tg(llm: LLM) -> float:
    sp = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0, ignore_eos=True)
    m = llm.generate([PROMPT], sp, use_tqdm=False)[0].metrics
    return (OUTPUT_LEN - 1) / (m.finished_time - m.first_token_time)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--files", required=True, help="NAME=PATH,... GGUF files both engines run")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    files = dict(item.split("=", 1) for item in args.files.split(","))
    threads = [int(t) for t in args.threads.split(",")]
    import torch

    llms = {name: LLM(path, dtype="bfloat16", kv_cache_memory=256 << 20, max_num_seqs=1)
            for name, path in files.items()}
    for llm in llms.values():  # warm-up (compiled ops, first-touch pages)
        llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.repeats):
        for name, path in files.items():
            for t in threads:
                key = f"{name} t{t}"
                r = runs.setdefault(key, {"llama.cpp": [], "fleetlm": []})
                r["llama.cpp"].append(llama_bench_tg(args.llama_bench, path, t))
                torch.set_num_threads(t)
                r["fleetlm"].append(fleetlm_tg(llms[name]))
                print(f"{key}: llama.cpp {r['llama.cpp'][-1]:.1f}  fleetlm {r['fleetlm'][-1]:.1f} tok/s", flush=True)
    summary = {}
    for key, r in runs.items():
        best = {engine: max(v) for engine, v in r.items()}
        summary[key] = {**best, "ratio": best["fleetlm"] / best["llama.cpp"]}
        print(f"{key}: fleetlm {best['fleetlm']:.1f} / llama.cpp {best['llama.cpp']:.1f} = {summary[key]['ratio']:.2f}x")
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx512", "amx"))}) \
        if os.path.exists("/proc/cpuinfo") else []
    result = {"summary": summary, "runs": runs, "cpu": cpu_model(), "flags": flags, "load_1min": os.getloadavg()[0],
              "describe": {name: llm.engine.core.executor.worker.runner.model.config.quantization.describe()
                           for name, llm in llms.items()}}
    print(json.dumps({k: result[k] for k in ("cpu", "load_1min", "describe")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
