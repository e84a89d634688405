"""Trained draft heads vs the other proposers (issues 12 and 9): batch-1 decode on chat prompts.

Every engine (SmolLM2-135M-Instruct, same dtype, greedy, engine seed 0) answers the same held-out
chat prompts (benchmarks/data/draft_heads_chat.txt: never in the heads' training data), one
request at a time, interleaved prompt by prompt so that load drift hits all alike (the measuring
loop is ``spec_decode.batch1``). Reported per method: decode tok/s (first to last token, summed),
the ratio to ``off`` in the same run, acceptance rate, mean acceptance length and acceptance per
draft position.

  flock /tmp/fleetlm-bench.lock python benchmarks/draft_heads.py \\
      --eagle /tmp/fleetlm-heads/eagle --medusa /tmp/fleetlm-heads/medusa --out benchmarks/draft_heads.json

``--methods`` takes ``name[:k][@DIR]`` items (default: off, ngram:4, self_spec:4, eagle:4, medusa:3); ``@DIR``
names the head directory of that item (else ``--eagle`` / ``--medusa``), so two heads can run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the checkout's fleetlm, wherever it runs from
from spec_decode import batch1  # noqa: E402  (benchmarks/spec_decode.py: the same measuring loop)

from fleetlm import LLM  # noqa: E402

PROMPTS = Path(__file__).parent / "data" / "draft_heads_chat.txt"


def spec_config(name: str, k: int, heads: dict[str, str | None], adaptive: bool = True) -> dict | None:
    if name == "off":
        return None
    base = {"method": name, "num_speculative_tokens": k, "adaptive": adaptive}
    extra = {"ngram": {"prompt_lookup_min": 2, "prompt_lookup_max": 4},
             "self_spec": {"num_draft_layers": 10},
             "eagle": {"model": heads.get("eagle")}, "medusa": {"model": heads.get("medusa")}}[name]
    if extra.get("model", "") is None:
        raise ValueError(f"--{name} DIR is needed for method {name}")
    return {**base, **extra}


def per_position(llm: LLM) -> list[float]:
    spec = llm.engine.core.scheduler.spec
    if spec is None or not spec.stats.num_drafts:
        return []
    return [round(a / spec.stats.num_drafts, 3) for a in spec.stats.accepted_per_pos]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="off,ngram:4,self_spec:4,eagle:4,medusa:3")
    ap.add_argument("--eagle")
    ap.add_argument("--medusa")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--no-adaptive", action="store_true",
                    help="draft k tokens every step (the adaptive rule off): what the heads accept, whatever the cost")
    ap.add_argument("--out", default="benchmarks/draft_heads.json")
    args = ap.parse_args()
    prompts = [p for p in PROMPTS.read_text().splitlines() if p.strip()]
    heads = {"eagle": args.eagle, "medusa": args.medusa}
    llms = {}
    for item in args.methods.split(","):
        spec, _, head_dir = item.partition("@")
        name, _, k = spec.partition(":")
        item_heads = {**heads, name: head_dir} if head_dir else heads
        llms[item] = LLM(kv_cache_memory=256 << 20, seed=0,
                         speculative_config=spec_config(name, int(k or 4), item_heads, not args.no_adaptive))
    load_before = os.getloadavg()
    t0 = time.time()
    res = batch1(llms, prompts, args.max_tokens)
    off = res.get("off", {}).get("decode_tok_s")
    for item, r in res.items():
        r["vs_off"] = round(r["decode_tok_s"] / off, 3) if off else None
        r["accepted_per_position"] = per_position(llms[item])
        print(f"{item:40s} {r}", flush=True)
    out = {"prompts": prompts, "max_tokens": args.max_tokens, "heads": heads, "adaptive": not args.no_adaptive,
           "results": res,
           "load_avg_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
           "seconds": round(time.time() - t0, 1), "machine": platform.processor() or platform.machine(),
           "nproc": os.cpu_count()}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
