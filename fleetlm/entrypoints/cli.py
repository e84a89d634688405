"""``fleetlm`` command line: generate, chat, serve, bench throughput|serve, plan, profile, sim.

Engine flags mirror ``LLM(...)`` keyword arguments (``--max-model-len`` -> ``max_model_len``).
"""

from __future__ import annotations

import argparse
import os
import sys

from fleetlm.models.hub import DEFAULT_MODEL


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", help="auto | bfloat16 | float32 (float16 on CUDA)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", type=_bytes, help="KV cache bytes on CPU, e.g. 2GiB, 512MiB")
    g.add_argument("--gpu-memory-utilization", type=float, help="CUDA only (default 0.9)")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--num-threads", type=int, help="CPU intra-op threads (default: all usable cores)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch_paged", "cpu_native"])
    g.add_argument("--quantization", "-q", default=None,
                   help="weights quantized at load: int8 | int4 | int4_g32 | int4_g64 | int4_g128 | w8a8; "
                        "dequantize | gguf (a GGUF's quantized tensors; kept by default in bf16); gptq | awq "
                        "(a pre-quantized HF directory; picked up without it) (docs/QUANTIZATION.md)")
    g.add_argument("--kv-cache-dtype", default="auto", help="auto (the model dtype) | int8 | fp8_e4m3")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="ranks splitting every layer")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="stages splitting the layers")
    g.add_argument("--pipeline-layer-partition", type=_int_list,
                   help="layers per pipeline stage, e.g. 16,14 (default: as even as possible)")
    g.add_argument("--distributed-executor-backend", default="auto", choices=["auto", "uniproc", "multiproc", "ray"],
                   help="multiproc: one process per rank (auto when tp x pp > 1); under torchrun, its ranks")
    g.add_argument("--speculative-config", type=_json_object, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                        "(docs/SPEC_DECODE.md)")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE: shard whole experts over the tensor-parallel ranks (docs/MOE.md)")
    g.add_argument("--moe-capacity-factor", type=float, help="MoE: per-expert capacity factor (default: none)")
    g.add_argument("--moe-overflow-policy", default="reroute", choices=["drop", "reroute"],
                   help="MoE: what happens to assignments over capacity")
    g.add_argument("--moe-ep-dispatch", default="all_to_all", choices=["all_to_all", "all_reduce"],
                   help="MoE with expert parallelism: token dispatch")
    g.add_argument("--moe-replica-slots", type=int, default=0,
                   help="MoE with expert parallelism: spare expert slots per rank for copies of hot experts")
    g.add_argument("--moe-rebalance-interval", type=int, default=0,
                   help="MoE: forwards between replica rebalances from the observed load (0: never)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    keys = ("dtype", "device", "max_model_len", "block_size", "kv_cache_memory", "gpu_memory_utilization",
            "enable_prefix_caching", "max_num_batched_tokens", "max_num_seqs", "num_threads", "attention_backend",
            "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend",
            "pipeline_layer_partition", "speculative_config", "enable_expert_parallel", "moe_capacity_factor",
            "moe_overflow_policy", "moe_ep_dispatch", "moe_replica_slots", "moe_rebalance_interval",
            "quantization", "kv_cache_dtype")
    return {k: getattr(args, k) for k in keys}


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def run_as_torchrun_worker(args: argparse.Namespace) -> int | None:
    """Under ``torchrun`` every rank runs the same command; ranks other than 0 become model
    workers of rank 0's engine (which runs the command itself). Returns None on rank 0."""
    from fleetlm.executor.multiproc import launched_by_torchrun

    if not launched_by_torchrun() or int(os.environ["RANK"]) == 0:
        return None
    from fleetlm.config import EngineArgs
    from fleetlm.executor.worker_proc import run_worker

    engine_args = EngineArgs.from_kwargs(args.model, **engine_kwargs(args))
    if int(os.environ.get("WORLD_SIZE", 1)) != engine_args.world_size:
        raise ValueError(f"torchrun started {os.environ.get('WORLD_SIZE')} ranks but tensor_parallel_size x "
                         f"pipeline_parallel_size = {engine_args.world_size}")
    run_worker(engine_args, int(os.environ["RANK"]), None, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _bytes(text: str) -> int:
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for suffix, mult in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(float(t))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[])


def sampling_params(args: argparse.Namespace):
    from fleetlm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)


def cmd_generate(args: argparse.Namespace) -> int:
    from fleetlm import LLM

    if (rc := run_as_torchrun_worker(args)) is not None:
        return rc
    prompts = args.prompt or [sys.stdin.read()]
    with LLM(args.model, **engine_kwargs(args)) as llm:
        for out in llm.generate(prompts, sampling_params(args), use_tqdm=len(prompts) > 1):
            text = out.outputs[0].text
            print(text if len(prompts) == 1 else f"[{out.request_id}] {out.prompt!r} -> {text!r}", flush=True)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat: the whole conversation is re-sent each turn (the prefix cache makes the
    earlier turns cheap). Ctrl-D or /exit ends it; /reset starts over."""
    from fleetlm import LLM

    llm = LLM(args.model, **engine_kwargs(args))
    sp = sampling_params(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("fleetlm chat: type a message; /reset to start over, /exit or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = llm.chat(history, sp, use_tqdm=False)[0].outputs[0].text
        print(reply, flush=True)
        history.append({"role": "assistant", "content": reply})


def cmd_serve(args: argparse.Namespace) -> int:
    from fleetlm.entrypoints.serve_cli import run

    if (rc := run_as_torchrun_worker(args)) is not None:
        return rc
    return run(args, engine_kwargs(args))


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from fleetlm.bench.throughput import main as bench_main

    return bench_main(args)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from fleetlm.bench.serve import main as bench_serve_main

    return bench_serve_main(args)


def cmd_bench_moe(args: argparse.Namespace) -> int:
    from fleetlm.moe.bench import main as bench_moe_main

    return bench_moe_main(args, engine_kwargs(args))


def cmd_router(args: argparse.Namespace) -> int:
    from fleetlm.router.cli import run

    return run(args)


def cmd_cluster(args: argparse.Namespace) -> int:
    from fleetlm.router.cli import run_cluster_cli

    return run_cluster_cli(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from fleetlm.plan.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetlm", description="Serve, run and plan large language models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one or more prompts")
    g.add_argument("prompt", nargs="*", help="prompt text (read from stdin if omitted)")
    g.add_argument("--model", default=DEFAULT_MODEL, help="alias, GGUF file or HF model directory")
    add_engine_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat in the terminal")
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--system", help="system prompt")
    add_engine_args(c)
    add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    from fleetlm.entrypoints.serve_cli import add_arguments as add_serve_args

    add_serve_args(s)
    add_engine_args(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    t = b.add_parser("throughput", help="offline throughput vs HF transformers (and vLLM if importable)")
    from fleetlm.bench.throughput import add_arguments as add_bench_args

    add_bench_args(t)
    t.set_defaults(func=cmd_bench_throughput)

    bs = b.add_parser("serve", help="load-test any OpenAI-compatible server (TTFT, ITL, TPOT, goodput)")
    from fleetlm.bench.serve import add_arguments as add_bench_serve_args

    add_bench_serve_args(bs)
    bs.set_defaults(func=cmd_bench_serve)

    bm = b.add_parser("moe", help="MoE expert usage: tokens per expert per layer (heatmap), imbalance, step time")
    from fleetlm.moe.bench import add_arguments as add_bench_moe_args

    add_bench_moe_args(bm)
    add_engine_args(bm)
    bm.set_defaults(func=cmd_bench_moe)

    r = sub.add_parser("router", help="one OpenAI endpoint over many fleetlm serve replicas (docs/ROUTER.md)")
    from fleetlm.router.cli import add_arguments as add_router_args

    add_router_args(r)
    r.set_defaults(func=cmd_router)
    cl = sub.add_parser("cluster", help="place whole replicas on a Ray cluster behind the router (fleetlm[ray])")
    from fleetlm.router.cli import add_cluster_arguments

    add_cluster_arguments(cl)
    cl.set_defaults(func=cmd_cluster)

    pl = sub.add_parser("plan", help="capacity planning: memory, KV sizing, roofline, parallelism")
    from fleetlm.plan.cli import add_arguments as add_plan_args

    add_plan_args(pl)
    pl.set_defaults(func=cmd_plan)
    _add_sim_commands(sub)
    from fleetlm.train.cli import add_train_command  # fleetlm/train/cli.py, docs/TRAINING.md

    add_train_command(sub)
    return p


def _add_sim_commands(sub) -> None:
    """``fleetlm profile`` and ``fleetlm sim`` (fleetlm/sim/cli.py, docs/SIM.md)."""
    from fleetlm.sim import cli as sim_cli

    pr = sub.add_parser("profile", help="measure this engine's step times (or derive them from the roofline)")
    sim_cli.add_profile_arguments(pr)
    pr.set_defaults(func=sim_cli.run_profile)
    sm = sub.add_parser("sim", help="simulate a fleet of replicas on the engine's scheduler")
    sim_cli.add_sim_arguments(sm)
    sm.set_defaults(func=sim_cli.run_sim)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"fleetlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
