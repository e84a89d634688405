"""Wiring of tenancy into ``fleetlm serve``: the registry, per-tenant metrics, SIGHUP reload,
and the per-request context (HTTP errors for a priority out of range or a vanished tenant)."""

from __future__ import annotations

import asyncio
import logging
import signal

from fleetlm.tenancy.admission import PriorityOutOfRange, RequestContext, TenantGone, resolve
from fleetlm.tenancy.gate import TenantGate
from fleetlm.tenancy.metrics import TenantMetrics
from fleetlm.tenancy.registry import TenantRegistry

logger = logging.getLogger("fleetlm")


def install_tenants(state) -> None:
    """With ``--tenants``: build the registry (shared prefixes tokenized with the model's
    tokenizer), per-tenant metrics, and reload on SIGHUP. The file was validated at start."""
    path = state.config.tenants_file
    if path is None:
        return
    tok = state.engine.tokenizer
    state.tenants = TenantRegistry(path, state.config.api_keys,
                                   encode=lambda text, special: tok.encode(text, add_special_tokens=special))
    state.metrics.tenants = TenantMetrics(state.metrics.registry, state.model_name)
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, state.tenants.reload)
    except (NotImplementedError, RuntimeError):  # no signals here (not the main thread / platform)
        logger.warning("SIGHUP reload of --tenants is not available in this process")
    logger.info("tenants: %d from %s (reload with SIGHUP)", len(state.tenants.tenant_ids), path)


def tenant_gate(state) -> TenantGate:
    metrics = getattr(state.metrics, "tenants", None)
    return TenantGate(state.tenants, metrics, state.engine.has_started)


def request_context(registry: TenantRegistry | None, tenant_id: str | None, priority: int | None,
                    cache_salt: str | None) -> RequestContext:
    from fleetlm.entrypoints.openai.protocol import APIError, bad_request

    try:
        return resolve(registry, tenant_id, priority, cache_salt)
    except PriorityOutOfRange as e:
        raise bad_request(str(e), "priority") from None
    except TenantGone as e:
        raise APIError(401, str(e), type="authentication_error", code="invalid_api_key") from None
