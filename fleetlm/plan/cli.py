"""``fleetlm plan``: capacity planning from the command line.

Wired into the main CLI as ``fleetlm plan`` (``add_arguments`` + ``run``); also runnable as
``python -m fleetlm.plan``. Exit status: 0 on success, 2 on bad input (the message names
what is wrong and the accepted values).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from fleetlm.plan.errors import PlanError

_INFER_ONLY = ("concurrency", "kv_dtype", "input_len", "output_len", "block_size",
               "max_batched_tokens", "dp", "cp", "plot", "int4_group_size")
_TRAIN_ONLY = ("tokens", "mfu", "micro_batch", "strategy", "activation_checkpointing")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fleetlm.plan.formats import KV_DTYPE_BYTES, weight_dtypes
    from fleetlm.plan.hardware import hardware_names
    from fleetlm.plan.model_catalog import catalog_names
    from fleetlm.plan.training import STRATEGIES

    g = parser.add_argument_group("model and hardware")
    g.add_argument("--model", required=True, help="catalog name (" + ", ".join(catalog_names())
                   + "), a fleetlm alias, a config.json / model directory, or a .gguf file")
    g.add_argument("--hardware", default="h100-sxm", help="one of " + ", ".join(hardware_names())
                   + " (default h100-sxm)")
    g.add_argument("--gpus", type=int, default=1, help="number of devices (default 1)")
    g.add_argument("--dtype", default=None, help="weight dtype: " + ", ".join(weight_dtypes())
                   + " (default bf16)")
    g.add_argument("--memory", type=float, help="device memory in bytes (override / custom)")
    g.add_argument("--mem-bandwidth", type=float, help="memory bandwidth, bytes/s")
    g.add_argument("--peak-flops", type=float, help="dense peak FLOP/s")
    g.add_argument("--interconnect-bw", type=float, help="per-device link bandwidth, bytes/s")
    g.add_argument("--probe", action="store_true",
                   help="measure this machine's bandwidth and FLOP/s (with --hardware cpu)")
    g.add_argument("--memory-utilization", type=float, default=0.9,
                   help="fraction of device memory the engine may use (default 0.9)")
    g.add_argument("--context", type=int, default=None, help="max tokens per sequence (default 4096)")
    g.add_argument("--tp", type=int, help="tensor parallel size (default: planned)")
    g.add_argument("--pp", type=int, help="pipeline parallel size (default: planned)")
    g.add_argument("--ep", type=int, help="expert parallel size (default: planned)")
    g.add_argument("--json", action="store_true", help="print the plan as JSON")

    i = parser.add_argument_group("inference")
    i.add_argument("--concurrency", type=int, help="concurrent sequences (default 1)")
    i.add_argument("--input-len", type=int, help="prompt tokens (default context - output)")
    i.add_argument("--output-len", type=int, help="generated tokens (default 256)")
    i.add_argument("--kv-dtype", choices=list(KV_DTYPE_BYTES), help="KV-cache dtype (default bf16)")
    i.add_argument("--block-size", type=int, help="KV block size in tokens (default 16)")
    i.add_argument("--max-batched-tokens", type=int, help="tokens per step (default 8192)")
    i.add_argument("--int4-group-size", type=int, help="int4 quantization group (default 128)")
    i.add_argument("--dp", type=int, help="data parallel replicas (default: planned)")
    i.add_argument("--cp", type=int, help="context parallel size (default: planned)")
    i.add_argument("--plot", metavar="PNG", help="draw the roofline to this file (matplotlib)")

    t = parser.add_argument_group("training")
    t.add_argument("--train", action="store_true", help="plan a training run instead")
    t.add_argument("--tokens", type=float, help="training tokens (default Chinchilla: 20/param)")
    t.add_argument("--mfu", type=float, help="model FLOPs utilization (default 0.4)")
    t.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default 1)")
    t.add_argument("--strategy", choices=STRATEGIES, help="data-parallel strategy (default: planned)")
    t.add_argument("--activation-checkpointing", choices=("on", "off"),
                   help="force activation checkpointing (default: planned)")

    from fleetlm.plan.fleet_cli import add_fleet_arguments
    from fleetlm.plan.pd_cli import add_pd_arguments

    add_fleet_arguments(parser)
    add_pd_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "disagg", False):
        from fleetlm.plan.pd_cli import run_disagg

        return run_disagg(args)
    if getattr(args, "fleet", False):
        from fleetlm.plan.fleet_cli import run_fleet

        return run_fleet(args)
    try:
        _check_flags(args)
        return _run(args)
    except PlanError as e:
        print(f"fleetlm plan: error: {e}", file=sys.stderr)
        return 2


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) not in (None, False)]


def _check_flags(args: argparse.Namespace) -> None:
    if args.train and (bad := _given(args, _INFER_ONLY)):
        raise PlanError(f"contradictory flags: {', '.join(bad)} apply to inference, not --train")
    if not args.train and (bad := _given(args, _TRAIN_ONLY)):
        raise PlanError(f"contradictory flags: {', '.join(bad)} need --train")
    if args.train and args.dtype not in (None, "bf16", "bfloat16"):
        raise PlanError(f"--train plans bf16 mixed precision; --dtype {args.dtype} does not apply")
    if args.probe and args.hardware.lower() != "cpu":
        raise PlanError(f"--probe measures this machine; use it with --hardware cpu, not {args.hardware}")
    if args.probe and (bad := _given(args, ("mem_bandwidth", "peak_flops"))):
        raise PlanError(f"contradictory flags: --probe measures what {', '.join(bad)} give")
    if args.gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {args.gpus}")


def _hardware(args: argparse.Namespace):
    from fleetlm.plan.hardware import get_hardware

    bw, flops = args.mem_bandwidth, args.peak_flops
    if args.probe:
        from fleetlm.plan.probe import probe

        result = probe()
        bw, flops = result.mem_bandwidth, result.peak_flops
        print(f"fleetlm plan: probe: {bw / 1e9:.1f} GB/s read, {flops / 1e9:.0f} GFLOP/s bf16 "
              f"matmul, {result.tcp_bandwidth / 1e9:.2f} GB/s loopback TCP, {result.threads} threads",
              file=sys.stderr)
    hw = get_hardware(args.hardware, memory=args.memory, mem_bandwidth=bw, peak_flops=flops,
                      interconnect_bw=args.interconnect_bw)
    if args.probe:  # the link between workers on this host, as measured
        hw = dataclasses.replace(hw, network_bw=result.tcp_bandwidth, page_fault_bw=result.fault_bandwidth)
    return hw


def _run(args: argparse.Namespace) -> int:
    from fleetlm.plan.model_load import load_model_spec
    from fleetlm.plan.render import render

    model = load_model_spec(args.model)
    hw = _hardware(args)
    if args.train:
        from fleetlm.plan.train_report import plan_training, training_sections

        ck = {None: None, "on": True, "off": False}[args.activation_checkpointing]
        report = plan_training(
            model, hw, gpus=args.gpus, tokens=args.tokens, mfu=args.mfu or 0.4,
            seq_len=args.context or 4096, micro_batch=args.micro_batch or 1,
            strategy=args.strategy, tp=args.tp, pp=args.pp, ep=args.ep, checkpointing=ck,
            memory_utilization=args.memory_utilization)
        sections, title = training_sections(report), "fleetlm plan --train"
    else:
        report = _inference(args, model, hw)
        from fleetlm.plan.render import inference_sections

        sections, title = inference_sections(report), "fleetlm plan"
        if args.plot:
            from fleetlm.plan.plot import plot_roofline

            print(f"fleetlm plan: roofline written to {plot_roofline(report, args.plot)}",
                  file=sys.stderr)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(render(sections, title), end="")
    return 0


def _inference(args: argparse.Namespace, model, hw):
    from fleetlm.plan.parallel import Forced
    from fleetlm.plan.report import plan_inference
    from fleetlm.plan.workload import Workload

    w = Workload(
        context=args.context or 4096, concurrency=args.concurrency or 1,
        output_len=args.output_len or 256, input_len=args.input_len,
        kv_dtype=args.kv_dtype or "bf16", block_size=args.block_size or 16,
        max_batched_tokens=args.max_batched_tokens or 8192,
        memory_utilization=args.memory_utilization)
    forced = Forced(tp=args.tp, pp=args.pp, ep=args.ep, dp=args.dp, cp=args.cp)
    return plan_inference(model, hw, gpus=args.gpus, dtype=args.dtype or "bf16", workload=w,
                          forced=forced, int4_group_size=args.int4_group_size or 128)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fleetlm plan",
        description="Capacity planning: memory, KV sizing, roofline, parallelism, training.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
