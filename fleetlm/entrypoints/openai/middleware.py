"""Pure-ASGI middleware of the server: status counting, body size limit, API keys, the
connection limit, and the loading / draining gate. Pure ASGI (not ``BaseHTTPMiddleware``) so
streaming and client disconnects pass through untouched."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from fleetlm.entrypoints.openai.protocol import APIError

OPEN_PATHS = frozenset({"/health", "/health/ready"})  # health probes: no key, no connection limit


async def send_error(send, status: int, message: str, type_: str, code: str | None = None,
                     headers: dict[str, str] | None = None) -> None:
    err = APIError(status, message, type=type_, code=code, headers=headers)
    body = json.dumps(err.body()).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """Raised from ``receive``: an HTTPException, so the framework answers it (413) rather than
    folding it into a generic body-parsing error."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class GuardMiddleware:
    """In order: count every response status; refuse oversize bodies (413); check the API key
    (401, constant-time compare against every key); refuse requests on connections past the
    limit (503, then the connection closes); refuse work while loading or draining (503)."""

    def __init__(self, app, *, api_keys: list[str], metrics_public: bool, max_body_bytes: int,
                 gate: Callable[[str], tuple[int, str, str] | None], on_status: Callable[[int], None],
                 over_connection_limit: Callable[[], bool] = lambda: False,
                 authenticate: Callable[[bytes], str | None] | None = None) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.metrics_public = metrics_public
        self.max_body = max_body_bytes
        self.gate = gate
        self.on_status = on_status
        self.over_connection_limit = over_connection_limit
        self.authenticate = authenticate  # with --tenants: key -> tenant id (fleetlm/tenancy), else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counting_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                self.on_status(msg["status"])
            await send(msg)

        path = scope["path"]
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await send_error(counting_send, 413, f"request body exceeds {self.max_body} bytes",
                                    "invalid_request_error", "body_too_large")
        if self.authenticate is not None and path not in OPEN_PATHS and not (self.metrics_public and path == "/metrics"):
            refused = self._tenant(scope, headers.get(b"authorization", b""), path)
            if refused is not None:
                return await send_error(counting_send, *refused)
        elif self.keys and path not in OPEN_PATHS and not (self.metrics_public and path == "/metrics"):
            if not self._authorized(headers.get(b"authorization", b"")):
                return await send_error(counting_send, 401, "invalid or missing API key (Authorization: Bearer <key>)",
                                        "authentication_error", "invalid_api_key",
                                        {"WWW-Authenticate": "Bearer"})
        if path not in OPEN_PATHS and self.over_connection_limit():
            return await send_error(counting_send, 503, "too many open connections; retry later",
                                    "service_unavailable", "too_many_connections",
                                    {"Retry-After": "1", "Connection": "close"})
        refusal = self.gate(path)
        if refusal is not None:
            status, message, code = refusal
            return await send_error(counting_send, status, message, "service_unavailable", code,
                                    {"Retry-After": "5"})
        received = 0

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge()
            return msg

        try:
            await self.app(scope, limited_receive, counting_send)
        except BodyTooLarge:
            if not started:
                await send_error(counting_send, 413, f"request body exceeds {self.max_body} bytes",
                                 "invalid_request_error", "body_too_large")
        except ClientDisconnect:  # the client left (or sent broken framing): no one to answer
            pass

    def _tenant(self, scope, header: bytes, path: str) -> tuple | None:
        """Map the key to its tenant (``scope["fleetlm.tenant"]``); the refusal to send, or None.
        ``/metrics`` (every tenant's figures) is for the operator's keys (--api-key) only."""
        scheme, _, token = header.partition(b" ")
        tenant = self.authenticate(token.strip() if scheme.lower() == b"bearer" else b"")
        if tenant is None:
            return (401, "invalid or missing API key (Authorization: Bearer <key>)", "authentication_error",
                    "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        if path == "/metrics" and tenant != "default":
            return 403, "/metrics is for the operator's keys (--api-key)", "permission_error", "forbidden"
        scope["fleetlm.tenant"] = tenant
        return None

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""
        ok = False
        for key in self.keys:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(token.strip(), key)
        return ok
