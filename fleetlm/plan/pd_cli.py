"""``fleetlm plan --disagg``: flags, checks and the printed P/D plan (``pd.py``)."""

from __future__ import annotations

import argparse
import json
import sys

from fleetlm.plan.errors import PlanError


def add_pd_arguments(parser: argparse.ArgumentParser) -> None:
    from fleetlm.plan.pd import TRANSPORTS

    g = parser.add_argument_group("disaggregated prefill/decode (--disagg; docs/PLAN.md)")
    g.add_argument("--disagg", action="store_true",
                   help="propose prefill and decode worker counts for --request-rate and --slo ttft:MS tpot:MS")
    g.add_argument("--kv-transport", default="tcp", help="KV path between workers: " + ", ".join(TRANSPORTS))
    g.add_argument("--kv-bandwidth", type=float, help="KV transfer bytes/s (default: from the transport)")
    g.add_argument("--kv-latency-ms", type=float, help="fixed cost of one transfer (default 0.05 ms)")


def run_disagg(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except PlanError as e:
        print(f"fleetlm plan --disagg: error: {e}", file=sys.stderr)
        return 2


def _slos(items: list[str] | None) -> tuple[float, float]:
    from fleetlm.plan.fleet_search import parse_slos

    if not items:
        raise PlanError("--disagg needs --slo ttft:MS tpot:MS")
    by = {s.metric: s for s in parse_slos(items)}
    if set(by) != {"ttft", "tpot"} or len(items) != 2:
        raise PlanError(f"--disagg takes exactly --slo ttft:MS tpot:MS (means), got {' '.join(items)}")
    if any(item.lower().startswith("p") for item in items):
        raise PlanError("--disagg plans for mean TTFT and TPOT; percentile SLOs need --fleet --pd P:D")
    return by["ttft"].ms / 1e3, by["tpot"].ms / 1e3


def _run(args: argparse.Namespace) -> int:
    from fleetlm.plan.cli import _hardware
    from fleetlm.plan.model_load import load_model_spec
    from fleetlm.plan.pd import kv_link, plan_pd
    from fleetlm.plan.report import resolve_format

    given = [n for n in ("fleet", "train", "concurrency", "dp", "cp", "pp", "ep", "plot", "tokens")
             if getattr(args, n, None)]
    if given or args.gpus != 1:
        raise PlanError(f"contradictory flags: --{', --'.join(given or ['gpus'])} do not apply to --disagg "
                        "(it sizes single-replica workers of --tp GPUs; give --request-rate or --users)")
    if (args.users is None) == (args.request_rate is None):
        raise PlanError("--disagg needs exactly one of --users (with --think-time) or --request-rate")
    rate = args.request_rate if args.request_rate is not None else args.users / args.think_time
    ttft, tpot = _slos(args.slo)
    for flag, v in (("--kv-bandwidth", args.kv_bandwidth), ("--kv-latency-ms", args.kv_latency_ms)):
        if v is not None and not (v > 0 if flag == "--kv-bandwidth" else v >= 0):
            raise PlanError(f"{flag} must be {'> 0' if flag == '--kv-bandwidth' else '>= 0'}, got {v}")
    model, hw = load_model_spec(args.model), _hardware(args)
    lat = None if args.kv_latency_ms is None else args.kv_latency_ms / 1e3
    link = kv_link(args.kv_transport, hw, args.kv_bandwidth, lat)
    plan = plan_pd(model, hw, resolve_format(model, args.dtype or "bf16"), rate=rate,
                   input_len=args.input_len or 1024, output_len=args.output_len or 256, ttft_slo_s=ttft,
                   tpot_slo_s=tpot, link=link, tp=args.tp or 1, kv_dtype=args.kv_dtype or "bf16",
                   memory_utilization=args.memory_utilization)
    if args.json:
        print(json.dumps(plan.as_json(), indent=2))
    else:
        print(render_pd(plan, model.name, hw.name, rate, ttft, tpot))
    return 0


def render_pd(p, model: str, hw: str, rate: float, ttft: float, tpot: float) -> str:
    gb = p.link.bandwidth / 1e9
    lines = [f"fleetlm plan --disagg: {model} on {hw}, {rate:,.2f} req/s; SLOs (means): TTFT {ttft * 1e3:,.0f} ms, "
             f"TPOT {tpot * 1e3:,.1f} ms",
             f"  prefill workers: {p.prefill_workers} x {p.gpus_per_worker} device(s)",
             f"  decode workers:  {p.decode_workers} x {p.gpus_per_worker} device(s)",
             f"  KV transfer: {p.kv_bytes_per_request / 2**20:,.1f} MiB per request over {p.link.transport} at "
             f"{gb:,.2f} GB/s ({p.link.how}) = {p.transfer_s * 1e3:,.2f} ms",
             f"  expected TTFT {p.ttft_s * 1e3:,.1f} ms, TPOT {p.tpot_s * 1e3:,.2f} ms"]
    lines += [f"  - {r}" for r in p.reasons]
    lines.append("  (means of an M/D/1 prefill queue and Little's law; `fleetlm plan --fleet --pd "
                 f"{p.prefill_workers}:{p.decode_workers}` simulates percentiles)")
    return "\n".join(lines)
