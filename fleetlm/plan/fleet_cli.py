"""``fleetlm plan --fleet``: flags, checks and the printed report."""

from __future__ import annotations

import argparse
import json
import math
import sys

from fleetlm.plan.errors import PlanError


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    f = parser.add_argument_group("fleet search (--fleet; docs/SIM.md)")
    f.add_argument("--fleet", action="store_true", help="search fleet configurations by simulation")
    f.add_argument("--users", type=float, help="concurrent users (request rate = users / think time)")
    f.add_argument("--think-time", type=float, default=33.3, help="seconds between one user's requests")
    f.add_argument("--request-rate", type=float, help="requests/s (instead of --users)")
    f.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in L(1 +- r)")
    f.add_argument("--slo", nargs="+", metavar="NAME:MS", help="e.g. ttft:1000 tpot:50 p99_e2el:30000")
    f.add_argument("--slo-percentile", type=float, default=90.0, help="percentile of NAME:MS SLOs (default 90)")
    f.add_argument("--fleet-tp", help="TP sizes to try, e.g. 1,2,4,8 (default: powers of two in a node)")
    f.add_argument("--routers", default="least_load", help="policies to try: round_robin,least_load,prefix")
    f.add_argument("--pd", default="none", help="P/D splits to try, e.g. none,1:1,1:3 (prefill:decode)")
    f.add_argument("--batch-sizes", default="256", help="max_num_seqs values to try, e.g. 128,256")
    f.add_argument("--max-replicas", type=int, default=4096)
    f.add_argument("--gpu-price", nargs="+", metavar="NAME=USD", help="hourly price per GPU overrides")
    f.add_argument("--sim-duration", type=float, default=30.0, help="simulated seconds measured per trial")
    f.add_argument("--sim-warmup", type=float, default=10.0, help="simulated seconds before measuring")
    f.add_argument("--sample-replicas", type=int, default=2, help="replicas simulated per trial")
    f.add_argument("--fleet-seed", type=int, default=0)
    f.add_argument("--top", type=int, default=8, help="candidates to print")
    f.add_argument("--save-result", metavar="OUT.json", help="also write the JSON report (every trial) here")


def _list(text: str, flag: str, conv=str) -> tuple:
    try:
        return tuple(conv(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise PlanError(f"{flag} {text!r}: expected a comma-separated list") from None


def _pd(text: str) -> tuple[int, int]:
    if text.lower() == "none":
        return (0, 0)
    p, sep, d = text.partition(":")
    if not sep or not p.isdigit() or not d.isdigit() or int(p) < 1 or int(d) < 1:
        raise ValueError
    return (int(p), int(d))


def _space_and_workload(args: argparse.Namespace):
    from fleetlm.plan.fleet_search import FleetWorkload, SearchSpace
    from fleetlm.sim.router import POLICIES

    if (args.users is None) == (args.request_rate is None):
        raise PlanError("--fleet needs exactly one of --users (with --think-time) or --request-rate")
    rate = args.request_rate if args.request_rate is not None else args.users / args.think_time
    if not (rate > 0 and math.isfinite(rate)):
        raise PlanError(f"the request rate must be a finite number > 0, got {rate}")
    routers = _list(args.routers, "--routers")
    if bad := [r for r in routers if r not in POLICIES]:
        raise PlanError(f"--routers: unknown policy {bad[0]!r}; accepted values: {', '.join(POLICIES)}")
    try:
        pd = tuple(_pd(x) for x in _list(args.pd, "--pd"))
    except ValueError:
        raise PlanError(f"--pd {args.pd!r}: each split is none or P:D with P, D >= 1 (e.g. none,1:2)") from None
    tp = _list(args.fleet_tp, "--fleet-tp", int) if args.fleet_tp else None
    if tp is not None and (not tp or min(tp) < 1):
        raise PlanError(f"--fleet-tp {args.fleet_tp!r}: TP sizes must be >= 1")
    seqs = _list(args.batch_sizes, "--batch-sizes", int)
    if seqs and min(seqs) < 1:
        raise PlanError("--batch-sizes must be >= 1")
    space = SearchSpace(_list(args.hardware, "--hardware"), tp, routers, pd, seqs, args.max_replicas)
    out_len = args.output_len or 256
    inp = args.input_len or 1024
    return space, FleetWorkload(rate, inp, out_len, args.range_ratio)


def run_fleet(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as e:  # PlanError, WorkloadError, ProfileError: bad input
        print(f"fleetlm plan --fleet: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from fleetlm.plan.fleet_eval import search_fleet
    from fleetlm.plan.fleet_search import SimSettings, parse_slos
    from fleetlm.plan.prices import parse_prices

    given = [n for n in ("concurrency", "dp", "cp", "ep", "pp", "plot", "tokens") if getattr(args, n, None)]
    if args.train or args.probe or given or args.gpus != 1:
        bad = given + [x for x, v in (("train", args.train), ("probe", args.probe), ("gpus", args.gpus != 1)) if v]
        raise PlanError(f"contradictory flags: --{', --'.join(bad)} do not apply to --fleet "
                        "(it chooses GPUs, TP and replicas itself; give --users or --request-rate)")
    slos = parse_slos(args.slo, args.slo_percentile)
    space, workload = _space_and_workload(args)
    if args.sim_duration <= 0 or args.sim_warmup < 0 or args.sample_replicas < 1:
        raise PlanError("--sim-duration must be > 0, --sim-warmup >= 0 and --sample-replicas >= 1")
    opts = {k: v for k, v in (("mfu", getattr(args, "mfu", None)),) if v is not None}
    settings = SimSettings(args.sim_duration, args.sim_warmup, args.sample_replicas, args.fleet_seed,
                           args.dtype or "bf16", args.context or 8192, args.max_batched_tokens or 8192,
                           args.memory_utilization, opts)
    plan = search_fleet(args.model, workload, slos, space, settings, parse_prices(args.gpu_price),
                        log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(plan_json(plan), indent=2))
    else:
        print(render_fleet(plan, args.top))
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(plan_json(plan) | {"report": render_fleet(plan, len(plan.outcomes))}, f, indent=1)
    return 0 if plan.best else 1


def _fmt_trial(t) -> str:
    return f"{t.replicas} replicas = {t.gpus} GPUs, ${t.usd_per_hour:,.2f}/h"


def render_fleet(plan, top: int = 8) -> str:
    from fleetlm.plan.prices import PRICE_SOURCE

    w, s = plan.workload, plan.settings
    lines = [f"fleetlm plan --fleet: {w.rate:,.0f} req/s, prompt {w.input_len} / output {w.output_len} tokens "
             f"(+-{w.range_ratio:.0%}), Poisson; SLOs: {', '.join(map(str, plan.slos))}",
             f"each trial: {s.warmup_s:g} s warm-up + {s.duration_s:g} s measured, {s.sample_replicas} replicas "
             f"simulated per pool; prices: {PRICE_SOURCE}", ""]
    done = sorted((o for o in plan.outcomes if o.best), key=lambda o: o.best.usd_per_hour)
    lines.append(f"{'candidate':<52} {'fleet':<34} {'TTFT p50/p90 ms':>16} {'TPOT p50/p90 ms':>16}")
    for o in done[:top]:
        v = o.best.values
        lines.append(f"{o.candidate.label:<52} {_fmt_trial(o.best):<34} "
                     f"{v['p50_ttft_ms']:>7,.0f}/{v['p90_ttft_ms']:<8,.0f} {v['p50_tpot_ms']:>7.1f}/{v['p90_tpot_ms']:<8.1f}")
    rest = [o for o in plan.outcomes if not o.best]
    if rest:
        lines += ["", "rejected:"]
        lines += [f"  {o.candidate.label}: {o.reason}" for o in rest]
    best = plan.best
    lines.append("")
    if best:
        lines.append(f"chosen: {best.candidate.label}, {_fmt_trial(best.best)} "
                     f"(${best.best.usd_per_hour * 24 * 30:,.0f} per 30 days)")
    else:
        lines.append("no candidate meets the SLOs")
    lines.append(f"search: {plan.evaluations} simulations in {plan.search_s:.1f} s")
    return "\n".join(lines)


def plan_json(plan) -> dict:
    def trial(t):
        return None if t is None else {"replicas": t.replicas, "gpus": t.gpus, "usd_per_hour": t.usd_per_hour,
                                       "meets": t.meets, "why": t.why, **t.values}

    best = plan.best
    return {"slos": [str(x) for x in plan.slos], "search_s": plan.search_s, "evaluations": plan.evaluations,
            "chosen": best.candidate.label if best else None, "chosen_fleet": trial(best.best) if best else None,
            "candidates": [{"candidate": o.candidate.label, "best": trial(o.best), "reason": o.reason,
                            "trials": [trial(t) for t in o.trials]} for o in plan.outcomes]}
