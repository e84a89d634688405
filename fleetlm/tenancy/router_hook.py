"""What a router (``fleetlm/router``) needs to be tenant-aware, without importing the server.

- ``tenant_of_headers(registry)``: a ``tenant_of(headers, body)`` function for
  ``RouteKeyMaker.tenant_of``: the tenant id of the request's API key, or None.
- ``salted_block_hashes``: the block hashes a replica computes for this tenant's prompt, so a
  precise prefix-aware policy looks up the same keys the replicas publish in their KV events.
- Quotas at the router: ``fleetlm/router/tenants.py`` builds its own ``TenantRegistry`` from the
  same file and admits with ``registry.state(tenant).admit(...)``; those buckets are per router
  (N routers admit up to N times a tenant's rate), while each replica still enforces the limits
  on what reaches it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fleetlm.core.block_pool import prompt_block_hashes
from fleetlm.tenancy.admission import resolve, tenancy_for
from fleetlm.tenancy.registry import TenantRegistry


def tenant_of_headers(registry: TenantRegistry) -> Callable[[Mapping[str, str], dict | None], str | None]:
    def tenant_of(headers: Mapping[str, str], body: dict | None) -> str | None:
        scheme, _, token = (headers.get("authorization") or headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return registry.authenticate(token.strip().encode())

    return tenant_of


def salted_block_hashes(registry: TenantRegistry | None, tenant_id: str | None, prompt_ids: list[int], block_size: int,
                        cache_salt: str | None = None) -> list[bytes]:
    """The chained block hashes a replica gives this prompt for this tenant (and request salt);
    without a registry (no ``--tenants``) only the request's own salt applies, as on a replica."""
    t = tenancy_for(resolve(registry, tenant_id, None, cache_salt), prompt_ids)
    return prompt_block_hashes(prompt_ids, block_size, t.cache_salt, t.shared_prefix_tokens, t.shared_salt)
