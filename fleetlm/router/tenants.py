"""The router's tenants (``fleetlm router --tenants FILE``): API keys -> tenants, limits enforced
with the router's own token buckets, and tokens counted from what the replicas answer.

Per router: each router process has its own buckets, so N routers admit up to N times a
tenant's rate (and every replica still enforces the limits on what reaches it). The file is the
replicas' file (``tenancy/config.py``); ``max_queued_requests`` is left to the replicas: the
router holds no queue and cannot see when a non-streamed request starts running.

Token accounting: a request takes one request and its prompt tokens at admission (counted with
the replicas' tokenizer when the router has one, ``--model``; otherwise 1, corrected from the
replica's ``usage``); output tokens are taken as a stream's chunks pass (one per choice delta)
and corrected to the replica's ``usage`` at the end. For a stream the router asks the replica
for ``usage`` (``stream_options.include_usage``) and removes it again if the client did not.

Invariant: every admitted request releases its concurrency slot exactly once (``finish``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from fleetlm.tenancy.admission import PriorityOutOfRange, RequestContext, TenantGone, resolve
from fleetlm.tenancy.quota import QuotaExceeded, TenantState, Usage
from fleetlm.tenancy.registry import TenantRegistry

logger = logging.getLogger("fleetlm.router")
CLOCK: Callable[[], float] = time.monotonic  # the buckets' clock (tests replace it)
# where the auth middleware leaves the request's tenant id (a typed key where aiohttp has them)
TENANT = web.RequestKey("tenant", str) if hasattr(web, "RequestKey") else "tenant"


def install_tenants(proxy, config, metrics) -> RouterTenants:
    """Build the router's tenant table (shared prefixes tokenized with the replicas' tokenizer
    when the router has one) and make the proxy and its route keys tenant-aware."""
    from fleetlm.tenancy.router_hook import tenant_of_headers

    hasher = proxy.keys.hasher
    encode = None if hasher is None else (lambda text, special: hasher.tok.encode(text, add_special_tokens=special))
    tenants = RouterTenants(config.tenants_file, config.api_keys, metrics, encode,
                            None if hasher is None else hasher.num_prompt_tokens, CLOCK)
    proxy.tenants = tenants
    proxy.keys.registry = tenants.registry
    proxy.keys.tenant_of = tenant_of_headers(tenants.registry)
    return tenants


class Refused(Exception):
    """The router answers this request itself (400/401/429), before any replica sees it."""

    def __init__(self, status: int, message: str, code: str, kind: str, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.kind, self.param, self.retry_after = status, code, kind, param, retry_after

    def response(self) -> web.Response:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return web.Response(status=self.status, body=json.dumps(body).encode(), content_type="application/json",
                            headers=headers)


def bearer(headers: Mapping[str, str]) -> bytes:
    scheme, _, token = (headers.get("Authorization") or "").partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""


class RouterTenants:
    """The router's tenant table (reloaded on SIGHUP) and admission."""

    def __init__(self, path: str, default_keys: tuple[str, ...], metrics,
                 encode: Callable[[str, bool], list[int]] | None = None,
                 count_prompt: Callable[[str, dict], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = TenantRegistry(path, default_keys, encode, clock)
        self.metrics = metrics  # RouterMetrics (its tenant_* series)
        self.count_prompt = count_prompt  # (path, body) -> prompt tokens, when the router has a tokenizer
        self._note_router_limits()

    def authenticate(self, headers: Mapping[str, str]) -> str | None:
        return self.registry.authenticate(bearer(headers))

    def reload(self) -> bool:
        ok = self.registry.reload()
        if ok:
            self._note_router_limits()
        return ok

    def _note_router_limits(self) -> None:
        queued = [t.tenant_id for t in self.registry.config.tenants.values()
                  if t.limits.max_queued_requests is not None]
        if queued:
            logger.info("tenants %s: max_queued_requests is enforced by each replica, not by the router (the "
                        "router holds no queue and cannot see when a non-streamed request starts)",
                        ", ".join(queued))

    def admit(self, tenant_id: str, path: str, obj: dict | None) -> Admission:
        """Check the priority range and take the tenant's quota, or raise ``Refused`` having
        taken nothing."""
        priority = obj.get("priority") if obj is not None else None
        if not isinstance(priority, int) or isinstance(priority, bool):
            priority = None  # absent: the tenant's default; not an integer: the replica answers 400
        try:
            ctx = resolve(self.registry, tenant_id, priority, None)
        except PriorityOutOfRange as e:
            raise Refused(400, str(e), "invalid_value", "invalid_request_error", "priority") from None
        except TenantGone as e:
            raise Refused(401, str(e), "invalid_api_key", "authentication_error") from None
        exact = obj is not None and self.count_prompt is not None
        prompt = 1
        if exact:
            try:
                prompt = self.count_prompt(path, obj)
            except Exception:  # the replica refuses it (400): count one token, corrected from its answer
                exact, prompt = False, 1
        state = self.registry.state(tenant_id)
        try:
            usage = state.admit(prompt, {})  # no sequences: max_queued_requests is the replicas'
        except QuotaExceeded as e:
            self.metrics.on_tenant_refused(tenant_id, e.limit)
            raise Refused(429, str(e), "rate_limit_exceeded", "rate_limit_error", e.limit, e.retry_after) from None
        except ValueError as e:  # could never fit (more prompt tokens than a minute's worth)
            raise Refused(400, str(e), "invalid_value", "invalid_request_error", "tokens_per_minute") from None
        self.metrics.on_tenant_admitted(tenant_id)
        return Admission(ctx, state, usage, self.metrics, prompt, exact)


@dataclass(eq=False)
class Admission:
    """One admitted request's quota: output tokens are taken as they stream; ``finish``
    settles the count with the replica's ``usage`` and frees the concurrency slot."""

    ctx: RequestContext
    state: TenantState
    usage: Usage
    metrics: object
    prompt_charged: int
    prompt_exact: bool
    output_charged: int = 0
    reported: tuple[int, int] | None = None  # the replica's (prompt_tokens, completion_tokens)
    strip_usage: bool = False  # the router asked for the stream's usage; the client did not
    failed: bool = False  # the answer was an error (a replica's 4xx/5xx, or none at all)
    done: bool = False

    @property
    def tenant_id(self) -> str:
        return self.ctx.tenant.tenant_id if self.ctx.tenant is not None else ""

    def prepare_body(self, obj: dict | None, body: bytes) -> bytes:
        """The body to forward: a stream asks the replica for ``usage`` (removed again later)."""
        if obj is None or obj.get("stream") is not True:
            return body
        so = obj.get("stream_options")
        if so is None:
            so = {}
        if not isinstance(so, dict) or so.get("include_usage") is True:
            return body  # already asked for (or invalid: the replica answers 400)
        self.strip_usage = True
        return json.dumps({**obj, "stream_options": {**so, "include_usage": True}}).encode()

    def spend_output(self, n: int) -> None:
        if n:
            self.output_charged += n
            self.state.spend_output(n)

    def on_usage(self, usage) -> None:
        if isinstance(usage, dict):
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(p, int) and isinstance(c, int):
                self.reported = (p, c)

    def on_body(self, data: bytes) -> None:
        """A whole (non-streamed) answer: its ``usage``."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(obj, dict):
            self.on_usage(obj.get("usage"))

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        prompt, output = self.prompt_charged if self.prompt_exact else 0, self.output_charged
        if self.reported is not None:
            prompt, output = self.reported
            self.spend_output(prompt + output - self.prompt_charged - self.output_charged)
        elif self.failed:  # refused or never answered: the prompt was not computed, its tokens come back
            self.state.spend_output(-self.prompt_charged)
            prompt = 0
        elif not self.prompt_exact:
            prompt = 0  # a stream cut before its usage: the placeholder token stays taken
        self.state.release(self.usage)
        self.metrics.on_tenant_finished(self.tenant_id, prompt, output)


class StreamMeter:
    """Reads a proxied SSE stream event by event: counts output tokens as they pass (one per
    choice delta carrying text), records the final ``usage``, and drops that usage event (and
    the ``"usage": null`` of every chunk) when the router asked for it and the client did not.
    Returns the bytes to send on; a partial event waits for the rest."""

    def __init__(self, admission: Admission) -> None:
        self.adm = admission
        self.buf = b""

    def feed(self, chunk: bytes) -> bytes:
        self.buf += chunk
        *events, self.buf = self.buf.split(b"\n\n")
        return b"".join(self._event(e) for e in events)

    def flush(self) -> bytes:
        rest, self.buf = self.buf, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        raw = event + b"\n\n"
        if not event.startswith(b"data: {"):
            return raw
        try:
            obj = json.loads(event[6:])
        except (ValueError, UnicodeDecodeError):
            return raw
        if not isinstance(obj, dict):
            return raw
        self.adm.spend_output(sum(1 for c in obj.get("choices") or () if _has_output(c)))
        if obj.get("usage") is not None:
            self.adm.on_usage(obj["usage"])
            if self.adm.strip_usage and not obj.get("choices"):
                return b""
        if self.adm.strip_usage and "usage" in obj:
            del obj["usage"]
            return f"data: {json.dumps(obj)}\n\n".encode()
        return raw


def _has_output(choice) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return bool(text)
