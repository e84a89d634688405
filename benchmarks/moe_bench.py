"""MoE figures for benchmarks/RESULTS.md (issue 13), all from one run:

1. step time of a tiny-but-realistic Mixtral-style MoE (experts dominate the parameters and
   the prefill FLOPs) at EP=1, EP=2 (all-to-all and all-reduce dispatch) and TP=2;
2. under a skewed routing load (every token's top-2 lands mostly on experts 0 and 1, both on
   EP rank 0): expert and rank imbalance and step time without and with hot-expert replication;
3. the planner's parameter / active-parameter / weight-memory figures next to what the engine
   allocates on rank 0.

    flock /tmp/fleetlm-bench.lock python benchmarks/moe_bench.py --out benchmarks/moe_bench.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

HIDDEN, EXPERT_WIDTH, LAYERS, EXPERTS = 512, 1024, 4, 8


def build(out: Path, skew: bool) -> Path:
    """The benchmark MoE (random weights, SmolLM2's tokenizer, tied embeddings). ``skew``: every
    embedding shares a component ``v`` and routers 0 and 1 point along it."""
    import transformers

    from tests.moe_helpers import _tokenizer

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=49152, hidden_size=HIDDEN, intermediate_size=EXPERT_WIDTH,
                                     num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4,
                                     num_local_experts=EXPERTS, num_experts_per_tok=2, tie_word_embeddings=True,
                                     max_position_embeddings=2048, initializer_range=0.05, bos_token_id=1,
                                     eos_token_id=2)
    model = transformers.MixtralForCausalLM(cfg)
    if skew:
        with torch.no_grad():
            v = torch.randn(HIDDEN)
            v /= v.norm()
            model.model.embed_tokens.weight += 2.0 * v
            for layer in model.model.layers:
                w = layer.mlp.gate.weight
                w[0] += 4.0 * v
                w[1] += 3.5 * v
    model.save_pretrained(out, safe_serialization=True)
    _tokenizer(out)
    return out


def run(path: Path, prompts: list[list[int]], output_len: int, **kw) -> dict:
    from fleetlm import LLM, SamplingParams
    from fleetlm.moe.bench import _fresh, _minus, summarize

    with LLM(str(path), dtype="float32", kv_cache_memory=256 << 20, max_num_batched_tokens=1024, **kw) as llm:
        sp = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], sp, use_tqdm=False)  # warm-up
        core = llm.engine.core
        before, steps0 = _fresh(core), core.scheduler._next_step_id
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        report = _minus(_fresh(core), before)
        steps = core.scheduler._next_step_id - steps0
        model = core.executor.worker.runner.model
        rank0_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res = summarize(report, wall, steps, sum(len(p) + output_len for p in prompts))
    res.update(rank0_param_bytes=rank0_bytes, tokens=[o.outputs[0].token_ids for o in outs][:2],
               layout={k: v for k, v in kw.items()})
    return res


def planner(path: Path) -> dict:
    from fleetlm.plan.model_load import spec_from_config_file
    from fleetlm.plan.model_spec import count_params

    c = count_params(spec_from_config_file(path / "config.json"))
    return {"total_params": c.total, "active_params": c.active, "expert_params": c.experts,
            "weight_bytes_fp32": 4 * c.total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/moe_bench.json")
    ap.add_argument("--workdir", default="/tmp/fleetlm-moe-bench")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=8)
    args = ap.parse_args()
    work = Path(args.workdir)
    plain = build(work / "plain", skew=False) if not (work / "plain" / "config.json").exists() else work / "plain"
    skewed = build(work / "skewed", skew=True) if not (work / "skewed" / "config.json").exists() else work / "skewed"
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 49000) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    ep = {"tensor_parallel_size": 2, "enable_expert_parallel": True}
    layouts = {"ep1": {}, "ep2_all_to_all": ep, "ep2_all_reduce": {**ep, "moe_ep_dispatch": "all_reduce"},
               "tp2": {"tensor_parallel_size": 2}}
    out: dict = {"model": {"hidden": HIDDEN, "expert_width": EXPERT_WIDTH, "layers": LAYERS, "experts": EXPERTS,
                           "top_k": 2}, "workload": vars(args), "planner": planner(plain)}
    out["layouts"] = {name: run(plain, prompts, args.output_len, **kw) for name, kw in layouts.items()}
    repl = {**ep, "moe_replica_slots": 2, "moe_rebalance_interval": 4}
    out["skewed"] = {"ep2": run(skewed, prompts, args.output_len, **ep),
                     "ep2_replicated": run(skewed, prompts, args.output_len, **repl)}
    Path(args.out).write_text(json.dumps(out, indent=1))
    for name, r in {**out["layouts"], **{f"skewed/{k}": v for k, v in out["skewed"].items()}}.items():
        ri = r["rank_imbalance"]
        print(f"{name:22s} {r['step_ms']:8.1f} ms/step  {r['tokens_per_s']:8.0f} tok/s  expert imbalance "
              f"{r['mean_imbalance']:.2f}  rank imbalance {sum(ri) / len(ri) if ri else float('nan'):.2f}  "
              f"rank0 params {r['rank0_param_bytes'] / 2**20:.1f} MiB")
    print("planner:", out["planner"])


if __name__ == "__main__":
    main()
