"""``fleetlm router --pd``: disaggregated prefill and decode across two worker groups.

For each ``/v1/completions`` or ``/v1/chat/completions`` request (one prompt or conversation,
``n = 1``; no tools on chat):

1. a prefill worker (``fleetlm serve --kv-transfer-config '{"role": "producer", ...}'``) runs the
   prompt with ``max_tokens = 1`` and ``kv_transfer_params = {"do_remote_decode": true}``; it
   answers with the first token and a handle to its staged K/V. A prefill that fails (connection
   error, 429/5xx) is retried on another prefill worker.
2. a decode worker (``role: consumer``) gets the same body with the handle and ``max_tokens - 1``;
   it fetches the K/V and decodes. The router streams the first token (once the decode worker has
   accepted the handle) and then the decode worker's stream, or joins both texts in one response.
   A decode worker that is dead, refuses (5xx) or no longer finds the handle (404) leads to a
   fresh prefill and another decode worker.

A client that leaves cancels the handler (aiohttp handler cancellation): the upstream request in
progress is closed, so the worker aborts it and frees its blocks; a prefill that already
finished left only its staged copy, which the producer drops after ``handle_ttl_s``.
Invariant: every accepted request ends with a response or an error.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from fleetlm.disagg.relay import (
    ClientGone,
    check_body,
    decode_body,
    join_responses,
    max_tokens,
    only_prefill,
    prefill_body,
    relay_stream,
)

logger = logging.getLogger("fleetlm")


@dataclass(frozen=True)
class PDConfig:
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8080
    max_retries: int = 2  # fresh attempts (prefill + decode) after a failed one
    health_interval: float = 1.0
    health_timeout: float = 2.0
    startup_timeout: float = 120.0
    read_timeout: float = 600.0
    api_keys: tuple[str, ...] = ()
    worker_api_key: str | None = None

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError("router --pd needs at least one --prefill URL and one --decode URL")
        for url in self.prefill + self.decode:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"worker URL {url!r} must start with http:// or https://")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {self.max_retries}")


@dataclass(eq=False)
class PDWorker:
    url: str
    role: str  # prefill | decode
    healthy: bool = False
    in_flight: int = 0
    served: int = 0
    failures: int = 0


@dataclass
class PDStats:
    requests: int = 0
    prefill_retries: int = 0
    decode_retries: int = 0
    disconnects: int = 0
    errors: int = 0
    seconds_prefill: float = 0.0
    by_status: dict = field(default_factory=dict)


class _Failed(Exception):
    """An attempt failed before anything reached the client: try again elsewhere."""


def _error(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


class PDRouter:
    def __init__(self, config: PDConfig) -> None:
        self.config = config
        self.workers = [PDWorker(u, "prefill") for u in config.prefill] + [PDWorker(u, "decode") for u in config.decode]
        self.stats = PDStats()
        self._rr = itertools.count()
        self.session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task | None = None
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=config.read_timeout)

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        await self._check_all()
        self._health_task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self.session is not None:
            await self.session.close()

    async def wait_healthy(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.ready():
            await asyncio.sleep(0.2)
        return [] if self.ready() else [w.url for w in self.workers if not w.healthy]

    def ready(self) -> bool:
        return any(w.healthy for w in self.workers if w.role == "prefill") and \
            any(w.healthy for w in self.workers if w.role == "decode")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            await self._check_all()

    async def _check_all(self) -> None:
        await asyncio.gather(*(self._check(w) for w in self.workers))

    async def _check(self, w: PDWorker) -> None:
        try:
            async with self.session.get(w.url + "/health/ready", headers=self._headers(),
                                        timeout=aiohttp.ClientTimeout(total=self.config.health_timeout)) as r:
                w.healthy = r.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            w.healthy = False

    def _headers(self) -> dict[str, str]:
        key = self.config.worker_api_key
        return {"authorization": f"Bearer {key}"} if key else {}

    def pick(self, role: str, excluded: set[str]) -> PDWorker | None:
        cands = [w for w in self.workers if w.role == role and w.healthy and w.url not in excluded]
        if not cands:
            return None
        low = min(w.in_flight for w in cands)
        cands = [w for w in cands if w.in_flight == low]
        return cands[next(self._rr) % len(cands)]

    # -- the app ----------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health/ready", self.health)
        app.router.add_get("/workers", self.list_workers)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def health(self, request: web.Request) -> web.Response:
        ok = self.ready()
        return web.json_response({"status": "ok" if ok else "no healthy prefill or decode worker"},
                                 status=200 if ok else 503)

    async def list_workers(self, request: web.Request) -> web.Response:
        return web.json_response([{"url": w.url, "role": w.role, "healthy": w.healthy, "in_flight": w.in_flight,
                                   "served": w.served, "failures": w.failures} for w in self.workers])

    async def metrics(self, request: web.Request) -> web.Response:
        s = self.stats
        lines = [f"fleetlm_router_pd:{k} {getattr(s, k)}" for k in
                 ("requests", "prefill_retries", "decode_retries", "disconnects", "errors", "seconds_prefill")]
        return web.Response(text="\n".join(lines) + "\n")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if self.config.api_keys and request.headers.get("authorization", "") not in \
                {f"Bearer {k}" for k in self.config.api_keys}:
            return _error(401, "a valid API key is required (Authorization: Bearer KEY)", "invalid_api_key")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body is not valid JSON", "invalid_json")
        bad = check_body(body, chat)
        if bad is not None:
            return _error(400, bad[1], "invalid_request", bad[0])
        self.stats.requests += 1
        try:
            return await self._serve(request, body, chat)
        except ClientGone as e:  # the upstream request was dropped with it: the worker aborts
            self.stats.disconnects += 1
            return e.response
        except asyncio.CancelledError:
            self.stats.disconnects += 1
            raise

    async def _serve(self, request: web.Request, body: dict, chat: bool) -> web.StreamResponse:
        tried_p: set[str] = set()
        tried_d: set[str] = set()
        last = "no healthy worker"
        for attempt in range(1 + self.config.max_retries):
            p = self.pick("prefill", tried_p) or self.pick("prefill", set())
            d = self.pick("decode", tried_d) or self.pick("decode", set())
            if p is None or d is None:
                break
            try:
                pre = await self._prefill(p, body, chat)
            except _Failed as e:
                tried_p.add(p.url)
                self.stats.prefill_retries += attempt < self.config.max_retries
                last = str(e)
                continue
            if isinstance(pre, web.Response):
                return pre  # the prefill worker refused the request itself (4xx): the client's to fix
            if pre.get("kv_transfer_params") is None or max_tokens(body, chat) == 1:
                return await only_prefill(request, body, pre, chat)
            try:
                return await self._decode(request, d, body, pre, chat)
            except _Failed as e:
                tried_d.add(d.url)
                self.stats.decode_retries += attempt < self.config.max_retries
                last = str(e)
        self.stats.errors += 1
        return _error(503, f"disaggregated serving failed on every worker tried; last: {last}", "pd_unavailable")

    async def _post(self, w: PDWorker, body: dict, chat: bool) -> aiohttp.ClientResponse:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            return await self.session.post(w.url + path, json=body, headers=self._headers(), timeout=self.timeout)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            w.failures += 1
            w.healthy = False  # until the next health check says otherwise
            raise _Failed(f"{w.role} worker {w.url}: {type(e).__name__}: {e}") from None

    async def _prefill(self, w: PDWorker, body: dict, chat: bool) -> dict | web.Response:
        t0 = time.perf_counter()
        w.in_flight += 1
        try:
            resp = await self._post(w, prefill_body(body), chat)
            async with resp:
                data = await resp.read()
                if resp.status == 429 or resp.status >= 500:
                    w.failures += 1
                    raise _Failed(f"prefill worker {w.url} answered {resp.status}: {data[:300].decode(errors='replace')}")
                if resp.status != 200:
                    return web.Response(status=resp.status, body=data, content_type="application/json")
                w.served += 1
                return json.loads(data)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise _Failed(f"prefill worker {w.url}: {type(e).__name__}: {e}") from None
        finally:
            w.in_flight -= 1
            self.stats.seconds_prefill += time.perf_counter() - t0

    async def _decode(self, request: web.Request, w: PDWorker, body: dict, pre: dict,
                      chat: bool) -> web.StreamResponse:
        w.in_flight += 1
        try:
            resp = await self._post(w, decode_body(body, chat, pre["kv_transfer_params"]), chat)
            async with resp:
                if resp.status != 200:
                    data = await resp.read()
                    if resp.status in (404, 429) or resp.status >= 500:  # dead, overloaded, or the handle is gone
                        w.failures += resp.status >= 500
                        raise _Failed(f"decode worker {w.url} answered {resp.status}: "
                                      f"{data[:300].decode(errors='replace')}")
                    return web.Response(status=resp.status, body=data, content_type="application/json")
                w.served += 1
                if body.get("stream"):
                    return await relay_stream(request, resp, pre, w, chat)
                try:
                    dec = json.loads(await resp.read())
                except (aiohttp.ClientError, OSError, TimeoutError) as e:
                    raise _Failed(f"decode worker {w.url}: {type(e).__name__}: {e}") from None
                return web.json_response(join_responses(pre, dec, chat))
        finally:
            w.in_flight -= 1


async def run_pd_router(config: PDConfig) -> int:
    """Serve until SIGTERM/SIGINT; ``ValueError`` (exit 2) if no prefill or decode worker is healthy in time."""
    import signal

    router = PDRouter(config)
    await router.start()
    down = await router.wait_healthy(config.startup_timeout)
    if down:
        await router.close()
        raise ValueError(f"router --pd: no healthy prefill and decode worker within {config.startup_timeout:g} s "
                         f"(down: {', '.join(down)})")
    runner = web.AppRunner(router.build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    logger.info("P/D router on http://%s:%d: %d prefill, %d decode worker(s)", config.host, config.port,
                len(config.prefill), len(config.decode))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await router.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fleetlm.router.pd --prefill URL --decode URL [--port N]`` (also ``fleetlm router --pd``)."""
    import argparse

    p = argparse.ArgumentParser(prog="fleetlm router --pd")
    add_pd_arguments(p)
    args = p.parse_args(argv)
    try:
        return asyncio.run(run_pd_router(config_from_args(args)))
    except ValueError as e:
        print(f"fleetlm router: error: {e}")
        return 2


def add_pd_arguments(p) -> None:
    p.add_argument("--prefill", action="append", default=[], metavar="URL", help="--pd: a prefill worker (repeat)")
    p.add_argument("--decode", action="append", default=[], metavar="URL", help="--pd: a decode worker (repeat)")
    for flag, kind, default in (("--host", str, "127.0.0.1"), ("--port", int, 8080), ("--max-retries", int, 2),
                                ("--health-interval", float, 1.0), ("--startup-timeout", float, 120.0),
                                ("--worker-api-key", str, None)):
        try:
            p.add_argument(flag, type=kind, default=default)
        except Exception:  # noqa: BLE001 - the router's own parser already has it
            pass


def run_pd_cli(args) -> int:
    """``fleetlm router --pd``: the router's own flags, with ``--prefill`` / ``--decode`` instead of ``--worker``."""
    from fleetlm.log import configure_logging

    if getattr(args, "worker", None):
        raise ValueError("--pd takes --prefill and --decode workers, not --worker")
    config = config_from_args(args)  # ValueError -> exit 2 naming the flag
    configure_logging()
    return asyncio.run(run_pd_router(config))


def config_from_args(args) -> PDConfig:
    return PDConfig(prefill=tuple(args.prefill), decode=tuple(args.decode), host=args.host, port=args.port,
                    max_retries=args.max_retries, health_interval=args.health_interval,
                    startup_timeout=args.startup_timeout, worker_api_key=args.worker_api_key,
                    api_keys=tuple(getattr(args, "api_key", ()) or ()),
                    read_timeout=getattr(args, "read_timeout", 600.0))


if __name__ == "__main__":
    raise SystemExit(main())
