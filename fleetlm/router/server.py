"""The router's HTTP app (aiohttp) and its life cycle.

Routes: ``/v1/completions`` and ``/v1/chat/completions`` (routed), ``/v1/models`` (from any
healthy replica), ``/health`` and ``/health/ready`` (200 while a replica is routable),
``/metrics``, and the admin routes ``GET/POST/DELETE /workers`` (need an admin key).
Start-up: every worker given must pass a health check within ``startup_timeout`` (else the
router exits with code 2 naming them). SIGTERM/SIGINT: drain (new requests get 503, in-flight
ones finish up to ``shutdown_timeout``), then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time

import aiohttp
from aiohttp import web

from fleetlm.router.config import RouterConfig, WorkerSpec
from fleetlm.router.metrics import RouterMetrics
from fleetlm.router.pool import ReplicaPool, WorkerError
from fleetlm.router.proxy import Proxy, error_response

logger = logging.getLogger("fleetlm.router")
OPEN_PATHS = frozenset({"/health", "/health/ready"})


def _key_ok(request: web.Request, keys: tuple[str, ...]) -> bool:
    auth = request.headers.get("Authorization", "")
    token = auth[7:] if auth.startswith("Bearer ") else ""
    return any(hmac.compare_digest(token.encode(), k.encode()) for k in keys)


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics(config.policy)
        self.pool = ReplicaPool(config, self.metrics)
        self.session: aiohttp.ClientSession | None = None
        self.proxy: Proxy | None = None
        self.tenants = None  # RouterTenants with --tenants (router/tenants.py)
        self.draining = False

    async def start(self) -> None:
        conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(connector=conn, auto_decompress=False)
        self.proxy = Proxy(self.config, self.pool, self.metrics, self.session)
        if self.config.tenants_file is not None:
            from fleetlm.router.tenants import install_tenants

            self.tenants = install_tenants(self.proxy, self.config, self.metrics)
        await self.pool.start(self.session)

    async def close(self) -> None:
        await self.pool.close()
        if self.session is not None:
            await self.session.close()

    # -- app ----------------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._guard])
        app.router.add_post("/v1/completions", self._route)
        app.router.add_post("/v1/chat/completions", self._route)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/health/ready", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/workers", self._list_workers)
        app.router.add_post("/workers", self._add_worker)
        app.router.add_delete("/workers", self._remove_worker)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if request.path == "/workers":
            if not self.config.admin_keys:
                return error_response(403, "admin routes are disabled: start the router with --admin-key",
                                      "admin_disabled", "permission_error")
            if not _key_ok(request, self.config.admin_keys):
                return error_response(401, "the admin routes need 'Authorization: Bearer <admin key>'",
                                      "invalid_admin_key", "authentication_error")
        elif self.tenants is not None and request.path not in OPEN_PATHS:
            refused = self._tenant_auth(request)
            if refused is not None:
                return refused
        elif request.path not in OPEN_PATHS and self.config.api_keys and not _key_ok(request, self.config.api_keys):
            return error_response(401, "missing or invalid API key ('Authorization: Bearer <key>')",
                                  "invalid_api_key", "authentication_error")
        if self.draining and request.path.startswith("/v1/"):
            return error_response(503, "the router is shutting down", "draining")
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status == 413:
                return error_response(413, f"request body exceeds {self.config.max_body_bytes} bytes",
                                      "body_too_large", "invalid_request_error")
            return error_response(e.status, e.reason or "error", "http_error", "invalid_request_error")

    def _tenant_auth(self, request: web.Request) -> web.Response | None:
        """With --tenants: every key maps to a tenant (``--api-key`` keys: tenant ``default``);
        ``/metrics`` describes every tenant, so it needs an ``--api-key`` key when there are any."""
        tenant = self.tenants.authenticate(request.headers)
        if tenant is None:
            return error_response(401, "missing or invalid API key ('Authorization: Bearer <key>')",
                                  "invalid_api_key", "authentication_error")
        if request.path == "/metrics" and self.config.api_keys and not _key_ok(request, self.config.api_keys):
            return error_response(403, "/metrics needs an operator key (--api-key)", "forbidden", "permission_error")
        from fleetlm.router.tenants import TENANT

        request[TENANT] = tenant
        return None

    async def _route(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy.handle(request)

    async def _models(self, request: web.Request) -> web.Response:
        for rep in self.pool.replicas.values():
            if rep.routable():
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with self.session.get(rep.url + "/v1/models", headers=self.pool._headers(),
                                                timeout=aiohttp.ClientTimeout(total=10)) as resp:
                        if resp.status == 200:
                            return web.Response(body=await resp.read(), content_type="application/json")
        return error_response(503, "no healthy replica is available", "no_replica")

    async def _health(self, request: web.Request) -> web.Response:
        up = sum(1 for r in self.pool.replicas.values() if r.routable())
        ok = up > 0 and not self.draining
        status = "draining" if self.draining else ("ok" if ok else "no routable replica")
        return web.json_response({"status": status, "routable": up, "workers": self.pool.describe()},
                                 status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render(list(self.pool.replicas.values()))
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _list_workers(self, request: web.Request) -> web.Response:
        return web.json_response({"workers": self.pool.describe()})

    async def _worker_body(self, request: web.Request) -> dict:
        try:
            obj = json.loads(await request.read() or b"{}")
        except ValueError:
            raise WorkerError("the body must be JSON: {\"url\": \"http://host:port\"}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("url"), str):
            raise WorkerError("the body must be a JSON object with a 'url' string")
        unknown = sorted(set(obj) - {"url", "kv_events_endpoint"})
        if unknown:
            raise WorkerError(f"unknown field(s) {', '.join(unknown)}; accepted: url, kv_events_endpoint")
        return obj

    async def _add_worker(self, request: web.Request) -> web.Response:
        try:
            obj = await self._worker_body(request)
            spec = WorkerSpec(obj["url"], obj.get("kv_events_endpoint"))
            rep = await self.pool.add_worker(spec)
        except WorkerError as e:
            return error_response(e.status, str(e), "invalid_worker", "invalid_request_error")
        except ValueError as e:
            return error_response(400, str(e), "invalid_worker", "invalid_request_error")
        return web.json_response(rep.describe(), status=201)

    async def _remove_worker(self, request: web.Request) -> web.Response:
        try:
            url = request.query.get("url") or (await self._worker_body(request))["url"]
            from fleetlm.router.replica import normalize_url

            await self.pool.remove_worker(normalize_url(url))
        except WorkerError as e:
            return error_response(e.status, str(e), "invalid_worker", "invalid_request_error")
        except ValueError as e:
            return error_response(400, str(e), "invalid_worker", "invalid_request_error")
        return web.json_response({"removed": url})

    # -- draining -----------------------------------------------------------------------------------
    async def drain(self) -> None:
        self.draining = True
        deadline = time.monotonic() + self.config.shutdown_timeout
        logger.info("draining: %d request(s) in flight", self.proxy.in_flight)
        while self.proxy.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def run_router(config: RouterConfig) -> int:
    """Serve until SIGTERM/SIGINT. Returns the exit code (2: a worker never became healthy)."""
    router = Router(config)
    await router.start()
    down = await router.pool.wait_all_healthy(config.startup_timeout)
    if down:
        await router.close()
        raise ValueError(f"worker(s) never became healthy within {config.startup_timeout:g} s: {', '.join(down)}")
    runner = await open_site(router)
    freeze_heap()
    await wait_for_signal()
    await router.drain()
    await runner.cleanup()
    await router.close()
    return 0


async def open_site(router: Router) -> web.AppRunner:
    """Start serving the router's app on its host and port."""
    config = router.config
    runner = web.AppRunner(router.build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port, backlog=4096).start()
    logger.info("router (%s) on http://%s:%d over %d worker(s)", config.policy, config.host, config.port,
                len(router.pool.replicas))
    if router.tenants is not None:  # `fleetlm router` and `fleetlm cluster up` alike
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, router.tenants.reload)
    return runner


def freeze_heap() -> None:
    """Move every object alive after start-up (imports: maybe torch, through the CLI) out of the
    cyclic GC's sight: full collections would rescan them while requests wait."""
    import gc

    gc.collect()
    gc.freeze()


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
