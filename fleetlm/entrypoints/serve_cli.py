"""``fleetlm serve [MODEL]``: flags of the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fleetlm.models.hub import DEFAULT_MODEL

API_KEY_ENV = "FLEETLM_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="alias, GGUF file or HF model directory")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", help="the model id clients use (default: the model argument)")
    g.add_argument("--api-key", action="append", default=[],
                   help=f"require 'Authorization: Bearer KEY' (repeat for several; also ${API_KEY_ENV}, comma-separated)")
    g.add_argument("--api-key-file", type=Path, help="file with one API key per line")
    g.add_argument("--metrics-public", action="store_true", help="serve /metrics without an API key")
    g.add_argument("--max-request-body-bytes", type=int, default=1 << 20)
    g.add_argument("--max-queued-requests", type=int, help="bound on waiting sequences; more get 429")
    g.add_argument("--max-queued-tokens", type=int, help="bound on waiting prompt tokens; more get 429")
    g.add_argument("--request-timeout", type=float, help="seconds before a request is aborted (504)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish")
    g.add_argument("--timeout-keep-alive", type=float, default=10.0,
                   help="seconds a connection may stay idle, or take to send a whole request, before it is closed")
    g.add_argument("--max-connections", type=int, default=1000,
                   help="open connections; a request on a connection past this gets 503 (health probes exempt)")
    g.add_argument("--health-timeout", type=float, default=30.0,
                   help="/health fails if the engine loop does not answer a ping within this many seconds")
    g.add_argument("--enable-docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
    g.add_argument("--tenants", type=Path, help="TOML file: API keys -> tenants with weights, limits, priority ranges "
                   "and cache salts (docs/TENANCY.md); reloaded on SIGHUP")
    g.add_argument("--scheduling-policy", choices=["fcfs", "fair"],
                   help="fcfs (priority, then arrival) or fair (per-tenant weighted fair share); default: fair "
                        "with --tenants, else fcfs")
    lo = p.add_argument_group("LoRA adapters (docs/LORA.md)")
    lo.add_argument("--enable-lora", action="store_true",
                    help="serve LoRA adapters: requests pick one by 'model'; POST /v1/load_lora_adapter and "
                         "/v1/unload_lora_adapter change them at run time (implied by --lora-modules)")
    lo.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                    help='adapters to load at start: name=path or {"name": ..., "path": ...} (PEFT directories)')
    lo.add_argument("--max-loras", type=int, default=8, help="adapters loaded at once (default 8)")
    lo.add_argument("--allow-runtime-lora", action="store_true",
                    help="let API-key holders load/unload adapters by server path at run time")
    d = p.add_argument_group("data parallel and KV events (docs/ROUTER.md)")
    d.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine cores behind this server, each its own process and KV cache")
    d.add_argument("--data-parallel-policy", default="least_load", help="round_robin | least_load | prefix")
    d.add_argument("--kv-transfer-config", help="disaggregated prefill/decode (docs/DISAGG.md): JSON "
                   '{"role": "producer"|"consumer"|"both", "transport": "tcp"|"shm"|"torch_distributed", '
                   '"address": "HOST:PORT", "producers": ["HOST:PORT", ...]}')
    d.add_argument("--kv-events-endpoint", help="publish KV block events on this ZMQ PUB endpoint "
                   "(tcp://HOST:PORT or ipc://PATH; data-parallel core i uses PORT+i)")


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = list(args.api_key)
    if args.api_key_file is not None:
        if not args.api_key_file.is_file():
            raise ValueError(f"--api-key-file {args.api_key_file} does not exist")
        keys += [line.strip() for line in args.api_key_file.read_text().splitlines()]
    keys += os.environ.get(API_KEY_ENV, "").split(",")
    keys = [k.strip() for k in keys if k.strip()]
    return tuple(dict.fromkeys(keys))


def run(args: argparse.Namespace, engine_kwargs: dict) -> int:
    import asyncio

    from fleetlm.config import EngineArgs
    from fleetlm.entrypoints.openai.api_server import ServerConfig, serve
    from fleetlm.log import configure_logging

    for name in ("max_queued_requests", "max_queued_tokens", "max_request_body_bytes", "max_connections"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("request_timeout", "shutdown_timeout", "timeout_keep_alive", "health_timeout"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    configure_logging()
    keys = api_keys(args)
    if args.tenants is not None:
        from fleetlm.tenancy.config import load_tenants_file

        load_tenants_file(args.tenants, keys)  # a bad file is exit code 2 now, not after loading the model
    policy = args.scheduling_policy or ("fair" if args.tenants is not None else "fcfs")
    engine_kwargs = {**engine_kwargs, "scheduling_policy": policy, "data_parallel_size": args.data_parallel_size,
                     "data_parallel_policy": args.data_parallel_policy, "kv_events_endpoint": args.kv_events_endpoint}
    if args.kv_transfer_config is not None:
        engine_kwargs["kv_transfer_config"] = args.kv_transfer_config
    if args.enable_lora or args.lora_modules:
        from fleetlm.lora import parse_lora_modules

        engine_kwargs.update(enable_lora=True, lora_modules=parse_lora_modules(args.lora_modules),
                             max_loras=args.max_loras)
    elif args.max_loras != 8 or args.allow_runtime_lora:
        raise ValueError("--max-loras and --allow-runtime-lora need --enable-lora or --lora-modules")
    engine_args = EngineArgs.from_kwargs(args.model, **engine_kwargs)
    config = ServerConfig(
        host=args.host, port=args.port, served_model_name=args.served_model_name, api_keys=keys,
        metrics_public=args.metrics_public, max_request_body_bytes=args.max_request_body_bytes,
        max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
        request_timeout=args.request_timeout, shutdown_timeout=args.shutdown_timeout,
        health_timeout=args.health_timeout, timeout_keep_alive=args.timeout_keep_alive,
        max_connections=args.max_connections, enable_docs=args.enable_docs,
        tenants_file=None if args.tenants is None else str(args.tenants),
        allow_runtime_lora=args.allow_runtime_lora,
    )
    raise_fd_limit(config.max_connections)
    return asyncio.run(serve(engine_args, config))


def raise_fd_limit(max_connections: int, spare: int = 256) -> None:
    """Lift the soft open-files limit (up to the hard one) so ``max_connections`` sockets plus
    the server's own files fit: the limit, not the kernel, should turn connections away."""
    import logging
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + spare
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            logging.getLogger("fleetlm").warning(
                "open-files limit %d is below --max-connections %d + %d; connections past it will fail",
                new, max_connections, spare)
