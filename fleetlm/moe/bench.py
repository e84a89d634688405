"""``fleetlm bench moe``: run an MoE model on a seeded random workload and report how its
experts were used: tokens per expert per layer (a heatmap PNG), imbalance (max / mean), dropped
and rerouted assignments, and the throughput and mean engine-step time of the run."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fleetlm.moe.report import MoEReport, imbalance


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="an MoE model: HF directory (Mixtral, Qwen2/3-MoE) or alias")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heatmap", help="write the tokens-per-expert heatmap to this PNG (needs matplotlib)")
    p.add_argument("--save-result", help="write the counts and timings to this JSON file")


def main(args: argparse.Namespace, engine_kwargs: dict) -> int:
    import random

    from fleetlm import LLM, SamplingParams

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    with LLM(args.model, **engine_kwargs) as llm:
        if llm.engine.core.stats().moe is None:
            raise ValueError(f"{args.model} is not a mixture-of-experts model (no MoE layers to report)")
        rng = random.Random(args.seed)
        vocab = llm.get_tokenizer().vocab_size
        prompts = [{"prompt_token_ids": [rng.randrange(10, vocab - 10) for _ in range(args.input_len)]}
                   for _ in range(args.num_prompts)]
        sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
        core = llm.engine.core
        before, steps0 = _fresh(core), core.scheduler._next_step_id
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        report = _minus(_fresh(core), before)
        steps = core.scheduler._next_step_id - steps0
    result = summarize(report, wall, steps, args.num_prompts * (args.input_len + args.output_len))
    _print(result)
    if args.save_result:
        Path(args.save_result).write_text(json.dumps(result, indent=1))
    if args.heatmap:
        print(f"heatmap: {plot_heatmap(report, args.heatmap, title=Path(args.model).name)}")
    return 0


def _fresh(core) -> MoEReport:
    core.executor._moe_report = None  # bypass the report interval
    return core.stats().moe


def _minus(a: MoEReport, b: MoEReport) -> MoEReport:
    return MoEReport(a.layers, tuple(tuple(x - y for x, y in zip(p, q)) for p, q in zip(a.tokens, b.tokens)),
                     tuple(x - y for x, y in zip(a.dropped, b.dropped)),
                     tuple(x - y for x, y in zip(a.rerouted, b.rerouted)), a.replicas,
                     tuple(tuple(x - y for x, y in zip(p, q)) for p, q in zip(a.rank_tokens, b.rank_tokens)))


def summarize(r: MoEReport, wall_s: float, steps: int, tokens: int) -> dict:
    per_layer = [imbalance(t) for t in r.tokens]
    return {"wall_s": wall_s, "steps": steps, "step_ms": 1000 * wall_s / max(1, steps),
            "tokens_per_s": tokens / wall_s, "layers": list(r.layers),
            "tokens": [list(t) for t in r.tokens], "imbalance": per_layer,
            "max_imbalance": max(per_layer), "mean_imbalance": sum(per_layer) / len(per_layer),
            "dropped": sum(r.dropped), "rerouted": sum(r.rerouted), "replicas": [list(x) for x in r.replicas],
            "rank_tokens": [list(t) for t in r.rank_tokens],
            "rank_imbalance": [imbalance(t) for t in r.rank_tokens if len(t) > 1 and sum(t)]}


def _print(res: dict) -> None:
    print(f"{res['steps']} steps in {res['wall_s']:.2f} s: {res['step_ms']:.1f} ms/step, "
          f"{res['tokens_per_s']:.0f} tokens/s")
    print(f"imbalance (max/mean) mean over layers {res['mean_imbalance']:.2f}, worst {res['max_imbalance']:.2f}; "
          f"dropped {res['dropped']}, rerouted {res['rerouted']}")
    if res["rank_imbalance"]:
        ri = res["rank_imbalance"]
        print(f"EP rank imbalance mean over layers {sum(ri) / len(ri):.2f}, worst {max(ri):.2f}; "
              f"replicated experts per layer {[len(x) for x in res['replicas']]}")


def plot_heatmap(r: MoEReport, path: str | Path, title: str = "") -> Path:
    """Share of each layer's assignments per expert (rows: layers, columns: experts)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("--heatmap needs matplotlib: pip install 'fleetlm[plot]'") from e
    share = [[n / max(1, sum(row)) for n in row] for row in r.tokens]
    n_exp = len(r.tokens[0])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * n_exp + 2), max(3.0, 0.3 * len(r.layers) + 1.5)))
    im = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer (imbalance max/mean)")
    ax.set_yticks(range(len(r.layers)), [f"{i} ({imbalance(t):.2f})" for i, t in zip(r.layers, r.tokens)])
    ax.set_title(f"{title}: tokens per expert" if title else "tokens per expert", fontsize=10)
    fig.colorbar(im, ax=ax, label="share of the layer")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
