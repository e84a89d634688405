"""Tree vs chain verification for EAGLE and Medusa at batch 1 on SmolLM2-135M-Instruct (issue 9).

Each prompt goes alone through every engine in turn (interleaved, so load drift hits all alike):
no speculation, then {medusa, eagle} x {chain of k, default tree of depth k}, adaptive rule off
(every decode step verifies its drafts). Per engine: decode tok/s (first -> last token), mean
acceptance length (tokens per verification step), and ms per verification step (decode time /
verification steps: the step-cost side, meaningful even with random heads). Heads: trained ones
from --heads-dir if present (``medusa/`` and ``eagle/`` with model.safetensors), else random.

  PYTHONPATH=. flock /tmp/fleetlm-bench.lock python benchmarks/spec_tree.py --out benchmarks/spec_tree.json
  PYTHONPATH=. flock /tmp/fleetlm-bench.lock python benchmarks/spec_tree.py --stepcost --out benchmarks/spec_tree.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from spec_decode import CHAT, COPY, _reset_spec  # noqa: E402

from fleetlm import LLM, SamplingParams  # noqa: E402


def head_dir(method: str, heads_dir: Path, base: LLM) -> tuple[str, str]:
    """(directory, 'trained' | 'random')."""
    from fleetlm.spec_decode.heads import random_eagle_head, random_medusa_heads

    trained = heads_dir / method
    if (trained / "model.safetensors").exists() and (trained / "config.json").exists():
        return str(trained), "trained"
    tmp, cfg = Path(tempfile.gettempdir()), base.engine.model_config
    make = random_eagle_head if method == "eagle" else random_medusa_heads
    return str(make(tmp / f"fleetlm-tree-{method}", cfg)), "random"


def run(llms: dict[str, LLM], prompts: list[str], max_tokens: int) -> dict[str, dict]:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    for llm in llms.values():
        llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        _reset_spec(llm)
    tokens, seconds = dict.fromkeys(llms, 0), dict.fromkeys(llms, 0.0)
    for p in prompts:
        for name, llm in llms.items():
            (o,) = llm.chat([{"role": "user", "content": p}], sp, use_tqdm=False)
            tokens[name] += len(o.outputs[0].token_ids) - 1
            seconds[name] += o.metrics.last_token_time - o.metrics.first_token_time
    out = {}
    for name, llm in llms.items():
        r = {"decode_tok_s": round(tokens[name] / seconds[name], 2), "tokens": tokens[name]}
        spec = llm.engine.core.scheduler.spec
        steps = tokens[name]
        if spec is not None:
            s = spec.stats
            steps = max(1, s.num_drafts)
            r.update(acceptance_length=round(s.mean_acceptance_length, 3), acceptance_rate=round(s.acceptance_rate, 3),
                     verify_steps=s.num_drafts, drafted_tokens_per_step=spec.config.max_draft_tokens)
        r["ms_per_step"] = round(1000 * seconds[name] / steps, 2)
        out[name] = r
    return out


def stepcost(context: int, k: int, repeats: int) -> dict[str, dict]:
    """The target's forward + logits for one request's query at ``context`` cached tokens: a
    decode (1 token), a chain of k (1 + k, causal), the default tree of depth k (1 + nodes,
    tree mask) and, to separate size from mask, a chain as long as the tree. Median ms."""
    import statistics
    import time

    import numpy as np
    import torch

    from fleetlm.attention.base import BatchLayout, ForwardContext, forward_context
    from fleetlm.spec_decode.tree import DraftTree, default_tree

    llm = LLM(kv_cache_memory=256 << 20)
    runner = llm.engine.core.executor.worker.runner
    tree = DraftTree(default_tree(k))
    n = len(tree.paths)
    bs = runner.block_size
    blocks = list(range(1, 2 + (context + n + 1) // bs))
    cases = {"decode": (1, None), f"chain_{k}": (1 + k, None), f"tree_{n}": (1 + n, tree),
             f"chain_{n}": (1 + n, None)}

    def once(q: int, t) -> float:
        pos = np.arange(context, context + q)
        slots = np.array([blocks[p // bs] * bs + p % bs for p in pos])
        masks = None
        if t is not None:
            pos = context + np.concatenate([[0], t.depths])
            masks = (t.ancestor_matrix(n),)
        layout = BatchLayout(np.array([q]), np.array([context]), np.array([blocks]), torch.from_numpy(slots),
                             int(q == 1), tree_masks=masks)
        ids = torch.randint(100, 40000, (q,))
        t0 = time.perf_counter()
        with torch.inference_mode():
            meta = runner.backend.build_metadata(layout, runner.device)
            with forward_context(ForwardContext(runner.backend, meta, runner.kv_caches)):
                h = runner.model(ids, torch.from_numpy(pos), None)
            runner.model.compute_logits(h).argmax(-1).tolist()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(3):
        for q, t in cases.values():
            once(q, t)
    for _ in range(repeats):
        for name, (q, t) in cases.items():
            times[name].append(once(q, t))
    base = statistics.median(times["decode"])
    return {name: {"tokens": cases[name][0], "ms": round(1000 * statistics.median(v), 2),
                   "vs_decode": round(statistics.median(v) / base, 3)} for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--workloads", default="chat,copy")
    ap.add_argument("--methods", default="medusa,eagle")
    ap.add_argument("--heads-dir", default="/tmp/fleetlm-heads")
    ap.add_argument("--out", default="benchmarks/spec_tree.json")
    ap.add_argument("--stepcost", action="store_true", help="only the target-forward micro-benchmark")
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()
    if args.stepcost:
        out = Path(args.out)
        results = json.loads(out.read_text()) if out.exists() else {}
        results["stepcost"] = {"context": args.context, **stepcost(args.context, args.k, 40)}
        print(json.dumps(results["stepcost"], indent=1))
        out.write_text(json.dumps(results, indent=1))
        return
    base = LLM(kv_cache_memory=256 << 20)
    llms: dict[str, LLM] = {"off": base}
    heads = {}
    for m in args.methods.split(","):
        path, kind = head_dir(m, Path(args.heads_dir), base)
        heads[m] = {"path": path, "kind": kind}
        for shape in ("chain", "tree"):
            cfg = {"method": m, "model": path, "num_speculative_tokens": args.k, "adaptive": False,
                   "verification": shape}
            llms[f"{m}-{shape}"] = LLM(kv_cache_memory=256 << 20, speculative_config=cfg)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update(k=args.k, max_tokens=args.max_tokens, heads=heads)
    for w in args.workloads.split(","):
        results[w] = run(llms, CHAT if w == "chat" else COPY, args.max_tokens)
        for name, r in results[w].items():
            print(f"{w:5s} {name:13s} {r}", flush=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
