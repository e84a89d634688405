"""Speculative decoding on this CPU (issue 9): fixed prompts, greedy, SmolLM2-135M-Instruct.

Parts (each one short run; results merge into --out):
  batch1  decode tok/s at batch 1 (first -> last token, per request, summed) for each method on a
          copy-heavy workload (fix a typo / rename a variable and return the whole text) and a
          chat workload, with acceptance rate and mean acceptance length;
  conc16  output tok/s of 48 mixed requests with max_num_seqs=16, speculation on vs off;
  prefix  TTFT at batch 1 of requests sharing a long cached system prompt, on vs off.

  python benchmarks/spec_decode.py batch1 --methods off,ngram --out benchmarks/spec_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from fleetlm import LLM, SamplingParams

TEXT = ("The annual report of the river authority shows that water levels rose by twelve percent "
        "over the last year, mostly because of the heavy rains in the spring. The authority plans to "
        "repair three bridges, clean the northern canals and open a new visitor centre in the old mill. "
        "Volunteers are welcom to join the cleaning days every first Saturday of the month.")
CODE = ("def total(items):\n    x = 0\n    for item in items:\n        if item.price > 0:\n"
        "            x = x + item.price * item.quantity\n    return x\n\n"
        "def average(items):\n    x = total(items)\n    return x / len(items) if items else 0\n")
COPY = [f"Fix the spelling mistake in this text and return the whole corrected text:\n\n{TEXT}",
        f"Rename the variable x to result in this code and return the full code:\n\n{CODE}",
        f"Repeat the following text exactly, word for word:\n\n{TEXT}",
        f"Add a docstring to each function and return the full code:\n\n{CODE}"]
CHAT = ["What are three tips for staying healthy?", "Explain what a rainbow is to a child.",
        "Write a short poem about autumn.", "Give me an idea for a quick dinner."]
SYSTEM = ("You are the help desk assistant of the river authority. " + TEXT + " ") * 3
QUESTIONS = ["When are the cleaning days?", "How much did the water rise?", "Which bridges will be repaired?",
             "Where is the new visitor centre?", "Who can volunteer?", "Why did the water rise?"]


def draft_dir(llm: LLM, layers: int) -> Path:
    """SmolLM2 cut to its first ``layers`` layers, as a Hugging Face directory (same tokenizer)."""
    import torch
    from safetensors.torch import save_file

    from fleetlm.models.hub import resolve_model
    from fleetlm.models.loader import load_model_files

    out = Path(tempfile.gettempdir()) / f"fleetlm-spec-draft-{layers}"
    if (out / "model.safetensors").exists():
        return out
    files = load_model_files(resolve_model("smollm2-135m-instruct"), torch.float32)
    keep = {n: t.contiguous() for n, t in files.weights
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers}
    c = files.config
    out.mkdir(parents=True, exist_ok=True)
    save_file(keep, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": [c.architecture], "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": files.tokenizer.bos_token_id,
        "eos_token_id": files.tokenizer.eos_token_id}))
    files.tokenizer.backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": files.tokenizer.chat_template,
                                                           "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    return out


def spec_config(method: str, k: int, base: LLM | None) -> dict | None:
    from fleetlm.spec_decode.heads import random_eagle_head, random_medusa_heads

    tmp = Path(tempfile.gettempdir())
    cfg = base.engine.model_config if base is not None else None
    return {
        "off": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
        "draft_model": {"method": "draft_model", "num_speculative_tokens": k,
                        "model": str(draft_dir(base, 10)) if base else ""},
        "self_spec": {"method": "self_spec", "num_speculative_tokens": k, "num_draft_layers": 10},
        "eagle": {"method": "eagle", "num_speculative_tokens": k,
                  "model": str(random_eagle_head(tmp / "fleetlm-spec-eagle", cfg)) if cfg else ""},
        "medusa": {"method": "medusa", "num_speculative_tokens": min(k, 3),
                   "model": str(random_medusa_heads(tmp / "fleetlm-spec-medusa", cfg)) if cfg else ""},
    }[method]


def _spec_figures(llm: LLM) -> dict:
    spec = llm.engine.core.scheduler.spec
    if spec is None:
        return {}
    s = spec.stats
    return {"acceptance_rate": round(s.acceptance_rate, 3), "acceptance_length": round(s.mean_acceptance_length, 2),
            "drafts": s.num_drafts}


def _reset_spec(llm: LLM) -> None:
    from fleetlm.spec_decode.scheduling import SpecDecodeStats

    spec = llm.engine.core.scheduler.spec
    if spec is not None:
        spec.stats = SpecDecodeStats(accepted_per_pos=[0] * spec.config.num_speculative_tokens)


def batch1(llms: dict[str, LLM], prompts: list[str], max_tokens: int) -> dict[str, dict]:
    """Each prompt alone through every engine in turn (interleaved, so load drift hits all alike)."""
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    for llm in llms.values():
        llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        _reset_spec(llm)
    tokens, seconds = dict.fromkeys(llms, 0), dict.fromkeys(llms, 0.0)
    for p in prompts:
        for name, llm in llms.items():
            (o,) = llm.chat([{"role": "user", "content": p}], sp, use_tqdm=False)
            m = o.metrics
            tokens[name] += len(o.outputs[0].token_ids) - 1
            seconds[name] += m.last_token_time - m.first_token_time
    return {name: {"decode_tok_s": round(tokens[name] / seconds[name], 2), "tokens": tokens[name],
                   **_spec_figures(llm)} for name, llm in llms.items()}


def conc16(llm: LLM, max_tokens: int, warm: bool = True) -> dict:
    convs = [[{"role": "user", "content": p}] for p in (COPY + CHAT) * 6]
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    if warm:
        llm.chat(convs[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    _reset_spec(llm)
    t0 = time.perf_counter()
    outs = llm.chat(convs, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tok_s": round(n / dt, 2), "tokens": n, "seconds": round(dt, 2), **_spec_figures(llm)}


def prefix(llm: LLM, max_tokens: int) -> dict:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    conv = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}]
    llm.chat(conv, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # caches the system prompt
    ttfts, hits = [], 0
    for q in QUESTIONS:
        (o,) = llm.chat([conv[0], {"role": "user", "content": q}], sp, use_tqdm=False)
        ttfts.append(o.metrics.first_token_time - o.metrics.arrival_time)
        hits += o.num_cached_tokens or 0
    return {"ttft_ms_mean": round(1000 * sum(ttfts) / len(ttfts), 1), "cached_tokens": hits, **_spec_figures(llm)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["batch1", "conc16", "prefix"])
    ap.add_argument("--methods", default="off,ngram")
    ap.add_argument("--workloads", default="copy,chat")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out", default="benchmarks/spec_decode.json")
    ap.add_argument("--rounds", type=int, default=1,
                    help="conc16: run every method this many times, interleaved (engines built once)")
    args = ap.parse_args()
    base = LLM(kv_cache_memory=256 << 20) if any(m in args.methods for m in ("draft", "eagle", "medusa")) else None
    results = json.loads(Path(args.out).read_text()) if os.path.exists(args.out) else {}
    if args.part == "batch1":
        llms = {m: LLM(kv_cache_memory=256 << 20, speculative_config=spec_config(m, args.k, base))
                for m in args.methods.split(",")}
        for w in args.workloads.split(","):
            for method, r in batch1(llms, COPY if w == "copy" else CHAT, args.max_tokens).items():
                results.setdefault("batch1", {}).setdefault(w, {})[method] = r
                print(f"batch1 {w:5s} {method:12s} {r}", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        return
    if args.part == "conc16" and args.rounds > 1:
        results["conc16_interleaved"] = conc16_rounds(args, base)
        Path(args.out).write_text(json.dumps(results, indent=1))
        return
    for method in args.methods.split(","):
        llm = LLM(kv_cache_memory=256 << 20, speculative_config=spec_config(method, args.k, base), max_num_seqs=16)
        r = conc16(llm, args.max_tokens) if args.part == "conc16" else prefix(llm, args.max_tokens)
        results.setdefault(args.part, {})[method] = r
        print(f"{args.part} {method:12s} {r}", flush=True)
        llm.shutdown()
        Path(args.out).write_text(json.dumps(results, indent=1))

def conc16_rounds(args, base) -> dict:
    """Every method ``--rounds`` times, alternating, so load drift hits all alike; the median
    run per method and each round's ratio to the first method."""
    import statistics

    methods = args.methods.split(",")
    llms = {m: LLM(kv_cache_memory=256 << 20, speculative_config=spec_config(m, args.k, base), max_num_seqs=16)
            for m in methods}
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in (methods if r % 2 == 0 else methods[::-1]):
            runs[m].append(conc16(llms[m], args.max_tokens, warm=r == 0))
            print(f"round {r} {m:12s} {runs[m][-1]}", flush=True)
    first = methods[0]
    out = {"rounds": args.rounds, "runs": runs,
           "median_tok_s": {m: statistics.median(x["output_tok_s"] for x in runs[m]) for m in methods}}
    out["ratio_per_round"] = {m: [round(a["output_tok_s"] / b["output_tok_s"], 4)
                                  for a, b in zip(runs[m], runs[first])] for m in methods[1:]}
    out["median_ratio"] = {m: statistics.median(v) for m, v in out["ratio_per_round"].items()}
    print(json.dumps({k: out[k] for k in ("median_tok_s", "ratio_per_round", "median_ratio")}), flush=True)
    return out


if __name__ == "__main__":
    main()
