"""Per-request tenancy: who sent it, at what priority, with which cache salt.

The HTTP layer resolves a ``RequestContext`` once per request (after authentication) and puts it
in ``CURRENT`` (a context variable of the request's task); ``OpenAIServing.start`` turns it into
a ``Tenancy`` per engine request and takes the tenant's quota. Without ``--tenants`` there is no
tenant: a request's own ``cache_salt`` and ``priority`` still apply (as in vLLM).
"""

from __future__ import annotations

import contextvars
import hashlib
from dataclasses import dataclass

from fleetlm.request import Tenancy
from fleetlm.tenancy.config import TenantConfig
from fleetlm.tenancy.registry import SharedPrefix, TenantRegistry

TENANT_SCOPE_KEY = "fleetlm.tenant"  # the ASGI scope entry the auth middleware sets (a tenant id)


@dataclass(frozen=True)
class RequestContext:
    tenant: TenantConfig | None = None  # the config the request was admitted under (kept across reloads)
    priority: int = 0
    cache_salt: str | None = None  # the client's own salt, as sent
    shared: tuple[SharedPrefix, ...] = ()


NO_CONTEXT = RequestContext()
CURRENT: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "fleetlm_request_context", default=NO_CONTEXT)  # noqa: B039 - a frozen dataclass: immutable


class PriorityOutOfRange(ValueError):
    """The request's priority is outside its tenant's range (HTTP 400)."""


class TenantGone(Exception):
    """The key's tenant was removed by a reload after authentication (HTTP 401)."""


def resolve(registry: TenantRegistry | None, tenant_id: str | None, priority: int | None,
            cache_salt: str | None) -> RequestContext:
    """The request's context; ``PriorityOutOfRange`` (400) for a priority its tenant may not use."""
    if registry is None or tenant_id is None:
        return RequestContext(None, 0 if priority is None else priority, cache_salt)
    tenant = registry.tenant(tenant_id)
    if tenant is None:  # removed by a reload between authentication and here
        raise TenantGone("this API key's tenant no longer exists")
    lo, hi = tenant.priority_range
    if priority is None:
        priority = tenant.default_priority
    elif not lo <= priority <= hi:
        raise PriorityOutOfRange(f"priority {priority} is outside this tenant's allowed range [{lo}, {hi}]")
    return RequestContext(tenant, priority, cache_salt, registry.shared_prefixes_of(tenant))


def combined_salt(tenant_salt: str | None, cache_salt: str | None) -> str | None:
    """One digest of the tenant's secret salt and the request's own salt (None if neither):
    the engine, its logs and its hashes see only this digest."""
    if tenant_salt is None and cache_salt is None:
        return None
    h = hashlib.sha256(b"fleetlm-cache-salt\0")
    for part in (tenant_salt, cache_salt):
        h.update(b"\1" + part.encode() if part is not None else b"\0")
        h.update(b"\0")
    return h.hexdigest()


def tenancy_for(ctx: RequestContext, prompt_ids: list[int]) -> Tenancy:
    """The engine's ``Tenancy`` for one prompt of this request: the salt, and the longest
    opted-in shared prefix the prompt starts with (only its whole blocks are shared; they hold
    nothing but the public prefix's tokens)."""
    t = ctx.tenant
    salt = combined_salt(t.salt if t is not None else None, ctx.cache_salt)
    best, best_salt = 0, None
    for sp in ctx.shared:
        for ids in sp.token_ids:
            n = _common_prefix(prompt_ids, ids)
            if n > best:
                best, best_salt = n, sp.salt
    return Tenancy(tenant_id=t.tenant_id if t is not None else "", weight=t.weight if t is not None else 1.0,
                   priority=ctx.priority, cache_salt=salt, shared_prefix_tokens=best, shared_salt=best_salt)


def _common_prefix(a: list[int], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
