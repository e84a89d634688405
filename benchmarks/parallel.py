"""Tensor and pipeline parallelism on this machine: throughput per layout, the share of each
step spent in collectives (next to what ``fleetlm plan`` predicts for those all-reduces), and the
pipeline bubble.

    python benchmarks/parallel.py --model smollm2-135m-instruct --layouts 1x1,3x1,1x2
    python benchmarks/parallel.py --model even --layouts 1x1,2x1      # SmolLM2-sized, 12 heads

``even`` is a random-weight Llama with SmolLM2's sizes (576 hidden, 1536 MLP, 30 layers, 49152
vocabulary) but 12 query / 4 KV heads of 48, so that TP=2 divides it. Workload: fixed-seed random
prompt ids, greedy, ``ignore_eos``, bf16 (``--dtype``). Layout ``TxP`` = tensor x pipeline ranks,
each its own process (gloo). Per rank the workers time ``execute_model`` and every collective;
the bubble of a pipeline is ``1 - sum(stage compute) / (stages x wall time)``, where a stage's
compute is its step time minus the time it waited in ``recv`` or spent in ``send``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def even_model_dir() -> Path:
    """SmolLM2-sized random Llama with an even head count (cached in the temp dir)."""
    out = Path(tempfile.gettempdir()) / "fleetlm-bench-even-llama"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fleetlm.models.hub import resolve_model
    from fleetlm.models.loader import gguf_fields
    from fleetlm.models.tokenizer import tokenizer_from_gguf_fields

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    import gguf

    tok = tokenizer_from_gguf_fields(gguf_fields(gguf.GGUFReader(str(resolve_model("smollm2-135m-instruct")))))
    tok.backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    return out


def plan_comm_per_step(model: str, tp: int, pp: int, batch: int, context: int) -> float:
    """What the planner's roofline charges for one decode step's TP all-reduces and PP sends on
    a ``cpu`` machine (its defaults: 10 GB/s link, 20 us per collective)."""
    from fleetlm.models.hub import resolve_model
    from fleetlm.plan.formats import weight_format
    from fleetlm.plan.hardware import get_hardware
    from fleetlm.plan.model_load import spec_from_config_file, spec_from_gguf
    from fleetlm.plan.roofline import Machine, step_cost
    from fleetlm.plan.workload import Layout

    path = resolve_model(model)
    spec = spec_from_config_file(path / "config.json") if path.is_dir() else spec_from_gguf(path)
    hw = get_hardware("cpu", mem_bandwidth=20e9, peak_flops=1e11)
    return step_cost(Machine(spec, weight_format("bf16"), "bf16", hw, Layout(tp=tp, pp=pp)), "decode", batch, 1, context).t_comm_s


def run_layout(model: str, tp: int, pp: int, args) -> dict:
    from fleetlm import LLM, SamplingParams

    rng = np.random.default_rng(args.seed)
    prompts = [{"prompt_token_ids": rng.integers(100, 40000, args.input_len).tolist()} for _ in range(args.num_prompts)]
    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    with LLM(model, dtype=args.dtype, tensor_parallel_size=tp, pipeline_parallel_size=pp,
             enable_prefix_caching=False, kv_cache_memory=1 << 30) as llm:
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)  # warm-up
        ex = llm.engine.core.executor
        ex.collective_rpc("comm_stats", True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        stats = ex.collective_rpc("comm_stats", True)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    comm = ("all_reduce", "all_gather", "gather", "send")
    ranks = [{"step_s": s["step"], "collective_s": sum(s.get(k, 0.0) for k in comm), "recv_wait_s": s.get("recv", 0.0),
              "all_reduce_calls": s.get("all_reduce_calls", 0.0)} for s in stats]
    for r in ranks:
        r["collective_share"] = r["collective_s"] / r["step_s"] if r["step_s"] else 0.0
    stage_compute = [ranks[s * tp]["step_s"] - ranks[s * tp]["recv_wait_s"] - ranks[s * tp]["collective_s"]
                     for s in range(pp)]
    steps = args.output_len  # decode steps dominate: one per output token
    return {
        "layout": f"{tp}x{pp}", "output_tok_s": tokens / wall, "wall_s": wall, "ranks": ranks,
        "bubble_fraction": 1 - sum(stage_compute) / (pp * wall) if pp > 1 else None,
        "plan_comm_per_decode_step_s": plan_comm_per_step(model, tp, pp, args.num_prompts,
                                                         args.input_len + args.output_len // 2),
        "measured_collective_per_step_s": ranks[0]["collective_s"] / steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="alias, path, or 'even'")
    p.add_argument("--layouts", default="1x1,3x1,1x2", help="comma-separated TxP")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    model = str(even_model_dir()) if args.model == "even" else args.model
    results = []
    for lay in args.layouts.split(","):
        tp, pp = (int(x) for x in lay.split("x"))
        r = run_layout(model, tp, pp, args)
        results.append(r)
        share = ", ".join(f"{x['collective_share']:.0%}" for x in r["ranks"])
        bubble = "" if r["bubble_fraction"] is None else f"  bubble {r['bubble_fraction']:.0%}"
        print(f"{lay}: {r['output_tok_s']:.1f} output tok/s  collectives/step per rank [{share}]  "
              f"{r['measured_collective_per_step_s'] * 1e3:.1f} ms/step measured vs "
              f"{r['plan_comm_per_decode_step_s'] * 1e3:.2f} ms planned{bubble}", flush=True)
    base = results[0]["output_tok_s"]
    for r in results:
        r["vs_first"] = r["output_tok_s"] / base
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "cpus": os.cpu_count(),
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
