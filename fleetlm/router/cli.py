"""``fleetlm router``: flags -> ``RouterConfig`` -> ``run_router``."""

from __future__ import annotations

import argparse
import os

from fleetlm.router.policies import POLICIES

ADMIN_KEY_ENV = "FLEETLM_ROUTER_ADMIN_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker", "-w", action="append", default=[], metavar="URL[,KV_EVENTS_ENDPOINT]",
                   help="a fleetlm serve replica, e.g. http://10.0.0.5:8000 (repeat); with precise prefix "
                        "routing add its KV events endpoint after a comma: http://h:8000,tcp://h:5557")
    p.add_argument("--pd", action="store_true", help="disaggregated prefill/decode (docs/DISAGG.md): --prefill and "
                   "--decode workers instead of --worker (fleetlm/router/pd.py)")
    p.add_argument("--prefill", action="append", default=[], metavar="URL", help="--pd: a prefill worker (repeat)")
    p.add_argument("--decode", action="append", default=[], metavar="URL", help="--pd: a decode worker (repeat)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--policy", default="round_robin",
                   help=f"routing policy: {' | '.join(POLICIES)} (default round_robin)")
    p.add_argument("--prefix-mode", default="approximate", help="prefix policy: approximate | precise")
    p.add_argument("--balance-abs-threshold", type=int, default=8,
                   help="prefix policy: in-flight spread above which it balances load instead")
    p.add_argument("--balance-rel-threshold", type=float, default=1.5)
    p.add_argument("--cache-threshold", type=float, default=0.3,
                   help="prefix policy: least matched fraction of a prompt worth following")
    p.add_argument("--session-header", default="x-session-id", help="session policy: sticky key header")
    p.add_argument("--model", help="tokenizer source for --prefix-mode precise (alias, GGUF or HF dir)")
    p.add_argument("--block-size", type=int, default=16, help="the replicas' KV block size (precise mode)")
    p.add_argument("--api-key", action="append", default=[], help="clients must send one (repeat)")
    p.add_argument("--tenants", metavar="FILE",
                   help="tenants TOML (the replicas' file): keys -> tenants; their limits are enforced with this "
                        "router's own buckets (per router); SIGHUP reloads it (docs/TENANCY.md)")
    p.add_argument("--admin-key", action="append", default=[],
                   help=f"enables POST/DELETE /workers for holders (also ${ADMIN_KEY_ENV})")
    p.add_argument("--worker-api-key", help="API key the router sends to the replicas")
    p.add_argument("--max-retries", type=int, default=1, help="moves to another replica before a first token")
    p.add_argument("--health-interval", type=float, default=1.0)
    p.add_argument("--health-timeout", type=float, default=2.0)
    p.add_argument("--startup-timeout", type=float, default=120.0,
                   help="seconds for every --worker to become healthy (else exit 2)")
    p.add_argument("--add-timeout", type=float, default=30.0, help="POST /workers: seconds to become healthy")
    p.add_argument("--breaker-failures", type=int, default=3, help="consecutive failures that open a breaker")
    p.add_argument("--breaker-cooldown", type=float, default=5.0, help="seconds before a half-open trial")
    p.add_argument("--read-timeout", type=float, default=600.0, help="longest silence from a replica")
    p.add_argument("--shutdown-timeout", type=float, default=30.0)
    p.add_argument("--max-request-body-bytes", type=int, default=1 << 20)


def worker_spec(text: str):
    from fleetlm.router.config import WorkerSpec

    url, _, endpoint = text.partition(",")
    return WorkerSpec(url, endpoint or None)


def build_config(args: argparse.Namespace):
    from fleetlm.router.config import RouterConfig
    from fleetlm.router.policies import PolicyConfig

    admin = [*args.admin_key, *[k for k in os.environ.get(ADMIN_KEY_ENV, "").split(",") if k.strip()]]
    pc = PolicyConfig(prefix_mode=args.prefix_mode, balance_abs_threshold=args.balance_abs_threshold,
                      balance_rel_threshold=args.balance_rel_threshold, cache_threshold=args.cache_threshold)
    if pc.prefix_mode not in ("approximate", "precise"):
        raise ValueError(f"--prefix-mode must be approximate or precise, got {pc.prefix_mode!r}")
    if args.policy != "prefix" and args.prefix_mode != "approximate":
        raise ValueError("--prefix-mode applies to --policy prefix only")
    if args.tenants is not None:
        from fleetlm.tenancy.config import load_tenants_file

        load_tenants_file(args.tenants, tuple(args.api_key))  # a bad file: exit code 2 naming its line
    return RouterConfig(
        workers=tuple(worker_spec(w) for w in args.worker), host=args.host, port=args.port, policy=args.policy,
        policy_config=pc, session_header=args.session_header.lower(), model=args.model, block_size=args.block_size,
        api_keys=tuple(args.api_key), admin_keys=tuple(k.strip() for k in admin), worker_api_key=args.worker_api_key,
        max_retries=args.max_retries, health_interval=args.health_interval, health_timeout=args.health_timeout,
        startup_timeout=args.startup_timeout, add_timeout=args.add_timeout, breaker_failures=args.breaker_failures,
        breaker_cooldown=args.breaker_cooldown, read_timeout=args.read_timeout,
        shutdown_timeout=args.shutdown_timeout, max_body_bytes=args.max_request_body_bytes,
        tenants_file=args.tenants)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from fleetlm.entrypoints.serve_cli import raise_fd_limit
    from fleetlm.log import configure_logging
    from fleetlm.router.server import run_router

    if args.pd:  # disaggregated prefill/decode: its own small router (fleetlm/router/pd.py)
        from fleetlm.router.pd import run_pd_cli

        return run_pd_cli(args)
    if args.prefill or args.decode:
        raise ValueError("--prefill and --decode need --pd")
    config = build_config(args)  # ValueError -> exit 2 naming the flag
    configure_logging()
    raise_fd_limit(10_500)  # two sockets per stream: 5,000 streams and spare
    return asyncio.run(run_router(config))


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """``fleetlm cluster up``: the router's flags, the placement, and ``--serve-args``."""
    p.add_argument("action", choices=["up"], help="up: place the replicas and serve the router until SIGTERM")
    p.add_argument("--replicas", type=int, required=True, help="fleetlm serve replicas to place")
    p.add_argument("--address", help="Ray cluster to join (e.g. 10.0.0.1:6379 after `ray start --head`); "
                                     "default: start a local one")
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="Ray CPUs each replica reserves")
    add_arguments(p)
    p.add_argument("--serve-args", default="",
                   help="the `fleetlm serve` arguments of every replica, one string: 'MODEL --dtype float32 ...'")


def run_cluster_cli(args: argparse.Namespace) -> int:
    import asyncio
    import shlex

    from fleetlm.log import configure_logging

    serve_argv = shlex.split(args.serve_args)
    bad = [a for a in serve_argv if a in ("--host", "--port")]
    if bad:
        raise ValueError(f"{bad[0]} of the replicas is chosen by each actor on its node; leave it out")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.num_cpus_per_replica <= 0:
        raise ValueError(f"--num-cpus-per-replica must be > 0, got {args.num_cpus_per_replica}")
    config = build_config(args)
    from fleetlm.executor.ray_cluster import import_ray, run_cluster

    import_ray()  # ValueError (exit 2) naming the extra when Ray is missing
    configure_logging()
    return asyncio.run(run_cluster(config, args.replicas, serve_argv, args.address, args.num_cpus_per_replica))
