"""``fleetlm sim`` and ``fleetlm profile`` command lines.

Bad input (a trace with bad timestamps, a profile of another model, an SLO that does not
parse, ...) raises ``ValueError`` with a message naming it; the main CLI prints it and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from fleetlm.sim.router import POLICIES


# -- shared: where the profile comes from -------------------------------------------------------
def add_profile_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replica profile (one of --profile, --hardware, --step-time-ms)")
    g.add_argument("--profile", help="a JSON profile written by 'fleetlm profile'")
    g.add_argument("--hardware", help="a catalog GPU (h100-sxm, h200, ...): profile from the roofline")
    g.add_argument("--step-time-ms", type=float, help="every step takes this long (hand-checked scenarios)")
    g.add_argument("--model", help="model of the replicas (checked against --profile; required with --hardware)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel GPUs per replica (with --hardware)")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages per replica (with --hardware)")
    g.add_argument("--dtype", default="bf16", help="weight dtype (with --hardware)")
    g.add_argument("--mfu", type=float, default=None, help="fraction of peak FLOP/s reached (roofline, default 0.6)")
    g.add_argument("--mbu", type=float, default=None, help="fraction of memory bandwidth reached (default 0.8)")
    g.add_argument("--step-overhead-ms", type=float, default=None, help="per-step overhead (roofline, default 2)")
    e = p.add_argument_group("engine limits (default: the profile's)")
    e.add_argument("--max-num-seqs", type=int)
    e.add_argument("--max-num-batched-tokens", type=int)
    e.add_argument("--num-blocks", type=int, help="KV blocks per replica")
    e.add_argument("--max-model-len", type=int)
    e.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None)
    e.add_argument("--frontend-ms", type=float, help="client <-> engine latency added to TTFT and E2EL")
    e.add_argument("--serve-per-token-us", type=float, help="serving work per streamed token taken from the "
                   "engine's cores (CPU serving; see fleetlm.sim.calibrate)")


def profile_from_args(args: argparse.Namespace):
    from fleetlm.sim.profile import EngineLimits, fixed_profile, load_profile

    given = [f for f, v in (("--profile", args.profile), ("--hardware", args.hardware),
                            ("--step-time-ms", args.step_time_ms)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one replica profile: --profile FILE, --hardware NAME (with --model) "
                         f"or --step-time-ms MS (got {', '.join(given) or 'none'})")
    if args.profile:
        prof = load_profile(args.profile)
        prof.check_model(args.model, f"profile {args.profile!r}")
    elif args.hardware:
        if not args.model:
            raise ValueError("--hardware needs --model (a catalog model such as llama-3.1-8b)")
        from fleetlm.sim.roofline_profile import roofline_profile

        opt = {k: v for k, v in (("mfu", args.mfu), ("mbu", args.mbu)) if v is not None}
        if args.step_overhead_ms is not None:
            opt["overhead_s"] = args.step_overhead_ms / 1e3
        prof = roofline_profile(args.model, args.hardware, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                max_num_seqs=args.max_num_seqs or 256,
                                max_num_batched_tokens=args.max_num_batched_tokens or 8192,
                                max_model_len=args.max_model_len or 8192, **opt)
    else:
        prof = fixed_profile(args.step_time_ms / 1e3, EngineLimits(), args.model or "any")
    prof = prof.with_engine(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                            num_blocks=args.num_blocks, max_model_len=args.max_model_len,
                            enable_prefix_caching=args.enable_prefix_caching)
    from dataclasses import replace

    if args.frontend_ms is not None:
        prof = replace(prof, frontend_s=args.frontend_ms / 1e3)
    if args.serve_per_token_us is not None:
        prof = replace(prof, serve_per_token_s=args.serve_per_token_us / 1e6)
    return prof


# -- fleetlm sim --------------------------------------------------------------------------------
def add_sim_arguments(p: argparse.ArgumentParser) -> None:
    add_profile_source_args(p)
    f = p.add_argument_group("fleet")
    f.add_argument("--replicas", type=int, default=1, help="replicas in the fleet (prefill + decode with P/D)")
    f.add_argument("--router", default="round_robin", choices=POLICIES)
    f.add_argument("--prefill-replicas", type=int, default=0, help="> 0: that many prefill workers (P/D)")
    f.add_argument("--sample-replicas", type=int, help="simulate about this many replicas (default: all)")
    f.add_argument("--kv-bandwidth", type=float, default=50e9, help="P/D KV transfer bytes/s (default 50e9)")
    f.add_argument("--kv-latency-ms", type=float, default=1.0)
    w = p.add_argument_group("workload (as fleetlm bench serve)")
    w.add_argument("--dataset-name", default="random", choices=["random", "shared-prefix", "trace"])
    w.add_argument("--trace", help="CSV or JSONL: timestamp,input_len,output_len[,prefix_group,prefix_len,session_id]")
    w.add_argument("--num-prompts", type=int, help="requests (default 1000 unless --duration)")
    w.add_argument("--duration", type=float, help="seconds of arrivals instead of --num-prompts")
    w.add_argument("--request-rate", type=float, default=math.inf)
    w.add_argument("--users", type=float, help="concurrent users (rate = users / think time)")
    w.add_argument("--think-time", type=float, default=30.0, help="seconds between a user's requests")
    w.add_argument("--burstiness", type=float, default=1.0)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--random-input-len", type=int, default=1024)
    w.add_argument("--random-output-len", "--output-len", type=int, default=128)
    w.add_argument("--random-range-ratio", type=float, default=0.0)
    w.add_argument("--shared-prefix-len", type=int, default=512)
    w.add_argument("--suffix-len", type=int, default=128)
    w.add_argument("--num-prefixes", type=int, default=8)
    o = p.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50")
    o.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    o.add_argument("--metric-percentiles", default="50,90,99")
    o.add_argument("--warmup", type=float, default=0.0, help="do not measure requests arriving before (s)")
    o.add_argument("--save-result", metavar="OUT.json", help="metrics and per-request lists (bench serve layout)")
    o.add_argument("--timeline", metavar="OUT.csv", help="utilisation and queues over time")
    o.add_argument("--plot", metavar="OUT.png", help="plot the timeline (needs matplotlib: the plot extra)")
    o.add_argument("--timeline-interval", type=float, default=1.0)


def workload_from_args(args: argparse.Namespace):
    from fleetlm.sim.workload import WorkloadSpec, generate, load_trace

    if args.dataset_name == "trace" or args.trace:
        if not args.trace:
            raise ValueError("--dataset-name trace needs --trace FILE")
        return load_trace(args.trace)
    rate = args.request_rate
    if args.users is not None:
        if not (args.users > 0 and args.think_time > 0):
            raise ValueError("--users and --think-time must be > 0")
        rate = args.users / args.think_time
    num = args.num_prompts if args.num_prompts is not None or args.duration is not None else 1000
    return generate(WorkloadSpec(
        args.dataset_name, rate, num, args.duration, args.burstiness, args.seed, args.random_input_len,
        args.random_output_len, args.random_range_ratio, args.shared_prefix_len, args.suffix_len, args.num_prefixes))


def run_sim(args: argparse.Namespace) -> int:
    from fleetlm.bench.serve_metrics import (
        format_report,
        parse_goodput,
        parse_metric_names,
        parse_percentiles,
    )
    from fleetlm.sim import FleetConfig, simulate

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install matplotlib (or pip install 'fleetlm[plot]')") from None
    percentiles = parse_percentiles(args.metric_percentiles)
    shown = parse_metric_names(args.percentile_metrics)
    slos = parse_goodput(args.goodput)
    prof = profile_from_args(args)
    arrivals = workload_from_args(args)
    cfg = FleetConfig(replicas=args.replicas, router=args.router, prefill_replicas=args.prefill_replicas,
                      sample_replicas=args.sample_replicas, kv_bandwidth=args.kv_bandwidth,
                      kv_latency_s=args.kv_latency_ms / 1e3, warmup_s=args.warmup,
                      timeline_interval_s=args.timeline_interval, seed=args.seed)
    res = simulate(prof, cfg, arrivals)
    metrics = res.remeasure(tuple(percentiles), slos)
    rate = args.users / args.think_time if args.users else args.request_rate
    print(format_report(metrics, percentile_metrics=shown, percentiles=percentiles, max_concurrency=None,
                        request_rate=rate))
    print(summary(prof, res))
    if args.save_result:
        _save(args, metrics, res)
    if args.timeline:
        print(f"timeline written to {res.timeline.write_csv(args.timeline)}")
    if args.plot:
        from fleetlm.sim.plot import plot_timeline

        print(f"plot written to {plot_timeline(res.timeline, args.plot)}")
    return 0


def summary(prof, res) -> str:
    s = res.scheduler
    hit = s["prefix_hits"] / s["prefix_queries"] if s["prefix_queries"] else 0.0
    sim = ", ".join(f"{k} {v} of {res.fleet_replicas[k]}" for k, v in res.simulated_replicas.items())
    lines = [f"profile: {prof.model} on {prof.hardware} ({prof.source}, tp={prof.tp}, pp={prof.pp}); "
             f"KV {prof.engine.num_blocks} blocks x {prof.engine.block_size}",
             f"replicas simulated: {sim} (share of traffic {res.fraction:.4g})",
             f"simulated {res.requests_simulated} requests, {res.steps} steps in {res.wall_s:.2f} s wall "
             f"({res.steps / max(res.wall_s, 1e-9):,.0f} steps/s); preemptions {s['preemptions']}, "
             f"prefix-cache hit rate {hit:.1%}"]
    if res.overloaded:
        lines.append("stopped early: a replica's queue passed the overload limit")
    return "\n".join(lines)


def _save(args: argparse.Namespace, metrics: dict[str, Any], res) -> None:
    from fleetlm.bench.serve_metrics import result_json

    config = {k: v for k, v in vars(args).items() if not callable(v)}
    out = result_json(config, metrics, res.results)
    out["sim"] = {"simulated_replicas": res.simulated_replicas, "fleet_replicas": res.fleet_replicas,
                  "fraction": res.fraction, "steps": res.steps, "wall_s": res.wall_s,
                  "overloaded": res.overloaded, **res.scheduler}
    with open(args.save_result, "w") as f:
        json.dump(out, f, indent=1)
    print(f"saved {args.save_result}")


# -- fleetlm profile ----------------------------------------------------------------------------
def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    from fleetlm.entrypoints.cli import add_engine_args
    from fleetlm.models.hub import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="measure this model (or, with --hardware, a catalog model)")
    p.add_argument("--out", help="profile JSON to write (default profile-<model>[-<hardware>].json)")
    p.add_argument("--quick", action="store_true", help="fewer batches (~15 s): a rough profile, for tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frontend-ms", type=float, default=0.0, help="client <-> engine latency to record")
    r = p.add_argument_group("roofline profile instead of measuring (a catalog GPU)")
    r.add_argument("--hardware", help="catalog GPU: derive the profile from the roofline, measure nothing")
    r.add_argument("--tp", type=int, default=1)
    r.add_argument("--pp", type=int, default=1)
    r.add_argument("--mfu", type=float, default=None)
    r.add_argument("--mbu", type=float, default=None)
    r.add_argument("--step-overhead-ms", type=float, default=None)
    add_engine_args(p)


def run_profile(args: argparse.Namespace) -> int:
    from fleetlm.entrypoints.cli import engine_kwargs

    out = args.out or f"profile-{args.model.replace('/', '_')}{'-' + args.hardware if args.hardware else ''}.json"
    if args.hardware:
        from fleetlm.sim.roofline_profile import roofline_profile

        opt = {k: v for k, v in (("mfu", args.mfu), ("mbu", args.mbu)) if v is not None}
        if args.step_overhead_ms is not None:
            opt["overhead_s"] = args.step_overhead_ms / 1e3
        prof = roofline_profile(args.model, args.hardware, tp=args.tp, pp=args.pp,
                                dtype=args.dtype if args.dtype != "auto" else "bf16",
                                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                max_model_len=args.max_model_len or 8192, **opt)
    else:
        from fleetlm.sim.profile_measure import measure_profile

        kw = engine_kwargs(args)
        prof = measure_profile(args.model, kw, quick=args.quick, seed=args.seed, frontend_s=args.frontend_ms / 1e3,
                               log=lambda m: print(m, file=sys.stderr))
    prof.save(out)
    fit = prof.fit
    detail = (f"fit over {fit['samples']} steps: median error {fit['median_rel_err']:.1%}, "
              f"p90 {fit['p90_rel_err']:.1%}" if fit else "; ".join(prof.assumptions))
    print(f"profile of {prof.model} on {prof.hardware} ({prof.source}) written to {out}; {detail}")
    return 0
