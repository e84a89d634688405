"""The live tenant table of one server: API key -> tenant, each tenant's quota state, and reload.

``reload`` (on SIGHUP) parses the file again; if it is invalid the error is logged and the old
table stays. A request admitted before a reload keeps the tenant config it was admitted under
(priority, salt, shared prefixes); quota counters are kept per tenant id across reloads, so
in-flight requests release into the same counters. Keys are never stored or logged: the table
maps sha256 digests of keys.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleetlm.tenancy.config import (
    TenantConfig,
    TenantsConfig,
    TenantsFileError,
    key_digest,
    load_tenants_file,
)
from fleetlm.tenancy.quota import TenantState

logger = logging.getLogger("fleetlm")

Encoder = Callable[[str, bool], list[int]]  # (text, add_special_tokens) -> token ids


@dataclass(frozen=True)
class SharedPrefix:
    name: str
    salt: str  # a digest of the name: every tenant that opted in hashes these blocks alike
    token_ids: tuple[tuple[int, ...], ...]  # tokenized with and without special tokens


class TenantRegistry:
    def __init__(self, path: str | Path, default_keys: tuple[str, ...] = (), encode: Encoder | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.default_keys, self.encode, self.clock = Path(path), default_keys, encode, clock
        self.states: dict[str, TenantState] = {}
        self.num_reloads = 0
        self._install(load_tenants_file(self.path, default_keys))  # errors propagate at start (exit 2)

    def _install(self, cfg: TenantsConfig) -> None:
        prefixes = {name: self._shared_prefix(name, text) for name, text in cfg.shared_prefixes.items()}
        by_key = {d: t.tenant_id for t in cfg.tenants.values() for d in t.key_digests}
        for tid, t in cfg.tenants.items():
            if tid in self.states:
                self.states[tid].apply(t.limits)
            else:
                self.states[tid] = TenantState(tid, t.limits, self.clock)
        self.config, self.prefixes, self._by_key = cfg, prefixes, by_key

    def _shared_prefix(self, name: str, text: str) -> SharedPrefix:
        salt = hashlib.sha256(b"fleetlm-shared-prefix\0" + name.encode()).hexdigest()
        ids = () if self.encode is None else tuple(dict.fromkeys(tuple(self.encode(text, s)) for s in (True, False)))
        return SharedPrefix(name, salt, ids)

    def reload(self) -> bool:
        """Re-read the file; on any error log it (it names the line) and keep the old table."""
        try:
            cfg = load_tenants_file(self.path, self.default_keys)
        except TenantsFileError as e:
            logger.error("tenants reload failed, keeping the previous configuration: %s", e)
            return False
        self._install(cfg)
        self.num_reloads += 1
        logger.info("tenants reloaded from %s: %d tenants", self.path, len(cfg.tenants))
        return True

    @property
    def tenant_ids(self) -> list[str]:
        return list(self.config.tenants)

    def authenticate(self, token: bytes) -> str | None:
        """The tenant id of this API key, or None. Looks up the key's digest, so the time taken
        does not depend on how much of a key matches."""
        if not token:
            return None
        return self._by_key.get(key_digest(token))

    def tenant(self, tenant_id: str) -> TenantConfig | None:
        return self.config.tenants.get(tenant_id)

    def state(self, tenant_id: str) -> TenantState:
        return self.states[tenant_id]

    def shared_prefixes_of(self, tenant: TenantConfig) -> tuple[SharedPrefix, ...]:
        return tuple(self.prefixes[n] for n in tenant.shared_prefixes if n in self.prefixes)
