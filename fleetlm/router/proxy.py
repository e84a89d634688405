"""Forwarding one request to a replica: retries before the first token, streams passed through
chunk by chunk (never buffered whole), clean error events when a replica vanishes mid-stream,
and the replica's request aborted when the client goes away (its connection is closed).

Invariant: every request the router accepts ends with a response or an error, and leaves its
replica's ``in_flight`` count as it found it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from fleetlm.router.config import RouterConfig
from fleetlm.router.keys import RouteKeyMaker
from fleetlm.router.metrics import RouterMetrics
from fleetlm.router.pool import ReplicaPool
from fleetlm.router.replica import Replica

RETRY_STATUSES = frozenset({429, 502, 503})  # the replica refused before doing anything: try another
BREAKER_STATUSES = frozenset({502, 503})  # ... and these count against its breaker
FORWARD_HEADERS = ("content-type", "authorization", "x-request-id", "accept")
SSE_DONE = b"data: [DONE]\n\n"


def error_response(status: int, message: str, code: str, kind: str = "server_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


def sse_error(message: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n" + SSE_DONE


@dataclass(frozen=True)
class Piped:
    """How a passed-through SSE stream ended: ``error`` (the upstream read failed), ``complete``
    (it ended with ``[DONE]``), ``client_gone`` (a write to the client failed; stopped there)."""

    error: str | None
    complete: bool
    client_gone: bool


async def pipe_sse(resp: aiohttp.ClientResponse, out: web.StreamResponse, tail: bytes = b"",
                   feed=None) -> Piped:
    """Copy ``resp``'s body to ``out`` chunk by chunk (``feed`` may rewrite each chunk) until the
    upstream ends; ``tail``: the end of what was already written."""
    while True:
        try:
            chunk = await resp.content.readany()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            return Piped(f"{type(e).__name__}: {e}", False, False)
        if not chunk:
            return Piped(None, tail == SSE_DONE, False)
        try:
            await out.write(chunk if feed is None else feed(chunk))
        except (ConnectionResetError, OSError):  # the client left (or the handler is cancelled)
            return Piped(None, False, True)
        tail = (tail + chunk)[-len(SSE_DONE):]


@dataclass(frozen=True)
class Retry:
    """This attempt failed before anything reached the client."""

    reason: str
    detail: str
    status: int = 503


class Proxy:
    def __init__(self, config: RouterConfig, pool: ReplicaPool, metrics: RouterMetrics,
                 session: aiohttp.ClientSession) -> None:
        self.config, self.pool, self.metrics, self.session = config, pool, metrics, session
        self.keys = RouteKeyMaker(config)
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout,
                                             sock_read=config.read_timeout)
        self.in_flight = 0
        self.tenants = None  # RouterTenants with --tenants: admission and token accounting (router/tenants.py)

    def _headers(self, incoming) -> dict[str, str]:
        out = {h: incoming[h] for h in FORWARD_HEADERS if h in incoming}
        if self.config.worker_api_key:
            out["authorization"] = f"Bearer {self.config.worker_api_key}"
        return out

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        self.in_flight += 1
        adm = None
        try:
            body = await request.read()
            obj = None
            if self.tenants is not None:
                from fleetlm.router.tenants import TENANT, Refused

                obj = _json_object(body)
                try:
                    adm = self.tenants.admit(request.get(TENANT), request.path, obj)
                except Refused as e:
                    return e.response()
                body = adm.prepare_body(obj, body)
            key = self.keys.make(request.path, body, request.headers, obj)
            headers = self._headers(request.headers)
            excluded: set[str] = set()
            last: Retry | None = None
            for attempt in range(1 + self.config.max_retries):
                d = self.pool.route(key, excluded)
                if d is None:
                    break
                if attempt:
                    self.metrics.retries.labels(last.reason).inc()
                else:
                    self.metrics.added_latency.observe(time.perf_counter() - t0)
                out = await self._attempt(request, d.replica, body, headers, adm)
                if not isinstance(out, Retry):
                    if adm is not None and out.status >= 400:
                        adm.failed = True
                    return out
                excluded.add(d.replica.url)
                last = out
            if adm is not None:
                adm.failed = True
            if last is None:
                self.metrics.no_replica.inc()
                return error_response(503, "no healthy replica is available", "no_replica")
            return error_response(last.status, f"every replica tried failed; last: {last.detail}", last.reason)
        except asyncio.CancelledError:
            self.metrics.disconnects.inc()
            raise
        finally:
            if adm is not None:
                adm.finish()
            self.in_flight -= 1

    async def _attempt(self, request: web.Request, rep: Replica, body: bytes, headers: dict,
                       adm=None) -> web.StreamResponse | Retry:
        rep.in_flight += 1
        resp: aiohttp.ClientResponse | None = None
        out: web.StreamResponse | Retry | None = None
        try:
            try:
                resp = await self.session.post(rep.url + request.path, data=body, headers=headers,
                                               timeout=self.timeout)
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                return self._failed(rep, "connect_error", f"{rep.url}: {type(e).__name__}: {e}", 502)
            if resp.status in RETRY_STATUSES:
                detail = (await resp.read())[:500].decode(errors="replace")
                if resp.status in BREAKER_STATUSES:
                    rep.breaker.record_failure()
                self.metrics.requests.labels(rep.url, f"status_{resp.status}").inc()
                return Retry(f"status_{resp.status}", f"{rep.url} answered {resp.status}: {detail}", resp.status)
            if resp.content_type == "text/event-stream":
                out = await self._stream(request, rep, resp, adm)
                return out
            try:
                data = await resp.read()
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                return self._failed(rep, "read_error", f"{rep.url}: {type(e).__name__}: {e}", 502)
            self._succeeded(rep, resp.status)
            if adm is not None:
                adm.on_body(data)
            out = web.Response(status=resp.status, body=data, content_type=resp.content_type)
            return out
        finally:
            rep.in_flight -= 1
            if resp is not None:
                if isinstance(out, web.StreamResponse) and resp.content.at_eof():
                    resp.release()  # read to the end: the connection goes back to the pool
                else:
                    resp.close()  # cancelled or failed: drop the connection, so the replica aborts the request

    def _failed(self, rep: Replica, reason: str, detail: str, status: int) -> Retry:
        rep.breaker.record_failure()
        self.metrics.requests.labels(rep.url, reason).inc()
        return Retry(reason, detail, status)

    def _succeeded(self, rep: Replica, status: int) -> None:
        if status < 500:
            rep.breaker.record_success()
        self.metrics.requests.labels(rep.url, "ok" if status < 400 else f"status_{status}").inc()

    async def _stream(self, request: web.Request, rep: Replica, resp: aiohttp.ClientResponse,
                      adm=None) -> web.StreamResponse | Retry:
        try:
            first = await resp.content.readany()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            return self._failed(rep, "stream_error", f"{rep.url} failed before the first token: {e}", 502)
        if not first:
            return self._failed(rep, "stream_error", f"{rep.url} closed the stream before the first token", 502)
        out = web.StreamResponse(status=resp.status, headers={"Content-Type": "text/event-stream",
                                                              "Cache-Control": "no-cache"})
        await out.prepare(request)
        meter = None
        if adm is not None:
            from fleetlm.router.tenants import StreamMeter

            meter = StreamMeter(adm)  # counts the tenant's tokens as they pass
        await out.write(first if meter is None else meter.feed(first))
        piped = await pipe_sse(resp, out, first[-len(SSE_DONE):], None if meter is None else meter.feed)
        if piped.client_gone:
            self.metrics.disconnects.inc()
            return out  # not read to the end: the upstream connection is dropped, the replica aborts
        if meter is not None:
            await out.write(meter.flush())
        if not piped.complete:
            rep.breaker.record_failure()
            self.metrics.stream_errors.labels(rep.url).inc()
            self.metrics.requests.labels(rep.url, "stream_error").inc()
            await out.write(sse_error(f"replica {rep.url} failed mid-stream ({piped.error or 'connection closed'}); "
                                      "the response is incomplete", "replica_failed"))
        else:
            self._succeeded(rep, resp.status)
        await out.write_eof()
        return out


def _json_object(body: bytes) -> dict | None:
    """The body as a JSON object, or None (the replica answers its 400)."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None
