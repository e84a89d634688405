"""The tenants file (``fleetlm serve --tenants FILE``, TOML) and its validation.

```toml
[tenants.acme]
api_keys = ["sk-acme-1", "sk-acme-2"]  # each key maps to exactly one tenant
weight = 3                             # fair share (> 0)
salt = "a long random secret"          # prefix-cache salt (default: derived from the keys)
priority_range = [0, 10]               # allowed request priorities (default [0, 0])
default_priority = 0                   # when a request sends none (default: 0, clamped into the range)
requests_per_minute = 600              # limits, each optional, each a positive number
tokens_per_minute = 200000             # prompt + output tokens
max_concurrent_requests = 32
max_queued_requests = 64               # sequences admitted whose first token has not come back yet
shared_prefixes = ["public-system"]    # opt in to these shared, named prefixes

[shared_prefixes.public-system]
text = "You are a helpful assistant."
```

Every error names the file and line (``FILE:LINE: ...``) and never contains an API key or a salt.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

TENANT_FIELDS = {"api_keys", "weight", "salt", "priority_range", "default_priority", "requests_per_minute",
                 "tokens_per_minute", "max_concurrent_requests", "max_queued_requests", "shared_prefixes"}
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests", "max_queued_requests")
INTEGER_LIMITS = {"max_concurrent_requests", "max_queued_requests"}
DEFAULT_TENANT = "default"  # holds the keys of --api-key / --api-key-file
TENANT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # ids are metric labels: short and plain


class TenantsFileError(ValueError):
    """The tenants file is invalid (the message names the line)."""


@dataclass(frozen=True)
class Limits:
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrent_requests: int | None = None
    max_queued_requests: int | None = None


@dataclass(frozen=True)
class TenantConfig:
    tenant_id: str
    key_digests: frozenset[bytes]  # sha256 of each API key: the keys themselves are not kept
    weight: float = 1.0
    salt: str = field(default="", repr=False)
    priority_range: tuple[int, int] = (0, 0)
    default_priority: int = 0
    limits: Limits = Limits()
    shared_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TenantsConfig:
    tenants: dict[str, TenantConfig]
    shared_prefixes: dict[str, str]  # name -> text


def key_digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def default_salt(tenant_id: str, key_digests: frozenset[bytes]) -> str:
    """A salt secret to whoever does not hold the tenant's keys, stable across replicas that
    load the same file (set ``salt`` explicitly to keep the cache across key rotations)."""
    h = hashlib.sha256(b"fleetlm-tenant-salt\0" + tenant_id.encode())
    for d in sorted(key_digests):
        h.update(d)
    return h.hexdigest()


class _Lines:
    """Where things are in the TOML text, for error messages."""

    def __init__(self, path: str, text: str) -> None:
        self.path, self.lines = path, text.splitlines()

    def _table_span(self, table: tuple[str, ...]) -> tuple[int, int]:
        want = ".".join(table)
        start = end = None
        for i, line in enumerate(self.lines):
            m = re.match(r"^\s*\[\s*([^\]]+?)\s*\]", line)
            if m:
                name = ".".join(p.strip().strip('"\'') for p in m.group(1).split("."))
                if start is not None and end is None:
                    end = i
                if name == want:
                    start, end = i, None
        if start is None:
            return 0, len(self.lines)
        return start, end if end is not None else len(self.lines)

    def line(self, table: tuple[str, ...], key: str | None = None, needle: str | None = None) -> int:
        """1-based line of ``key =`` (or of the string ``needle``) inside ``table``."""
        lo, hi = self._table_span(table)
        for i in range(lo, hi):
            text = self.lines[i]
            if needle is not None and (f'"{needle}"' in text or f"'{needle}'" in text):
                return i + 1
            if needle is None and key is not None and re.match(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=", text):
                return i + 1
        return lo + 1

    def top_line(self, name: str) -> int:
        """1-based line of a top-level key or table ``name``."""
        pat = re.compile(rf"^\s*(\[+\s*[\"']?{re.escape(name)}[\"']?\s*[.\]]|[\"']?{re.escape(name)}[\"']?\s*=)")
        return next((i + 1 for i, text in enumerate(self.lines) if pat.match(text)), 1)

    def error(self, line: int, message: str) -> TenantsFileError:
        return TenantsFileError(f"{self.path}:{line}: {message}")


def load_tenants_file(path: str | Path, default_keys: tuple[str, ...] = ()) -> TenantsConfig:
    """Parse and validate ``path``; ``default_keys`` (from ``--api-key``) form the tenant
    ``default``. Raises ``TenantsFileError`` naming the line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TenantsFileError(f"{path}: cannot read the tenants file: {e.strerror}") from None
    return parse_tenants(text, str(path), default_keys)


def parse_tenants(text: str, path: str = "<tenants>", default_keys: tuple[str, ...] = ()) -> TenantsConfig:
    loc = _Lines(path, text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TenantsFileError(f"{path}: not valid TOML: {e}") from None
    for name in doc:
        if name not in ("tenants", "shared_prefixes"):
            raise loc.error(loc.top_line(name), f"unknown field {name!r} (expected [tenants.ID] and [shared_prefixes.NAME])")
    prefixes = _parse_prefixes(doc.get("shared_prefixes", {}), loc)
    raw = doc.get("tenants", {})
    if not isinstance(raw, dict) or not raw:
        raise loc.error(loc.top_line("tenants"), "no tenants: add at least one [tenants.ID] table")
    tenants: dict[str, TenantConfig] = {}
    owner: dict[bytes, tuple[str, int]] = {}
    for tid, body in raw.items():
        tenants[tid] = _parse_tenant(tid, body, prefixes, loc, owner)
    if default_keys:
        if DEFAULT_TENANT in tenants:
            raise loc.error(loc.line(("tenants", DEFAULT_TENANT)), f"tenant id {DEFAULT_TENANT!r} is reserved for "
                            "the keys of --api-key / --api-key-file")
        digests = frozenset(key_digest(k) for k in default_keys)
        for d in digests:
            if d in owner:
                raise loc.error(owner[d][1], f"an API key of tenant {owner[d][0]!r} is also given with --api-key")
        tenants[DEFAULT_TENANT] = TenantConfig(DEFAULT_TENANT, digests, salt=default_salt(DEFAULT_TENANT, digests))
    return TenantsConfig(tenants, prefixes)


def _parse_prefixes(raw, loc: _Lines) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise loc.error(loc.top_line("shared_prefixes"), "shared_prefixes must be tables [shared_prefixes.NAME]")
    out = {}
    for name, body in raw.items():
        line = loc.line(("shared_prefixes", name))
        if not isinstance(body, dict) or set(body) != {"text"} or not isinstance(body["text"], str) or not body["text"]:
            bad = sorted(set(body) - {"text"}) if isinstance(body, dict) else []
            what = f"unknown field {bad[0]!r}" if bad else "needs exactly one field: text (a non-empty string)"
            raise loc.error(loc.line(("shared_prefixes", name), bad[0]) if bad else line,
                            f"shared prefix {name!r}: {what}")
        out[name] = body["text"]
    return out


def _parse_tenant(tid: str, body, prefixes: dict[str, str], loc: _Lines,
                  owner: dict[bytes, tuple[str, int]]) -> TenantConfig:
    table = ("tenants", tid)

    def fail(key: str | None, message: str, needle: str | None = None) -> TenantsFileError:
        return loc.error(loc.line(table, key, needle), f"tenant {tid!r}: {message}")

    if not TENANT_ID.match(tid):
        raise fail(None, "ids are 1-64 characters of letters, digits, '_', '.', '-'")
    if tid == "none":
        raise fail(None, "tenant id 'none' is reserved (the metrics label of requests without a tenant)")
    if not isinstance(body, dict):
        raise fail(None, "must be a table")
    for key in body:
        if key not in TENANT_FIELDS:
            raise fail(key, f"unknown field {key!r} (allowed: {', '.join(sorted(TENANT_FIELDS))})")
    keys = body.get("api_keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k.strip() for k in keys):
        raise fail("api_keys", "api_keys must be a non-empty list of non-empty strings")
    digests = set()
    for k in keys:
        d = key_digest(k.strip())
        line = loc.line(table, needle=k)
        if d in owner or d in digests:
            other = owner[d][0] if d in owner else tid
            raise loc.error(line, f"tenant {tid!r}: an API key is listed more than once (also for tenant {other!r})")
        digests.add(d)
        owner[d] = (tid, line)
    weight = body.get("weight", 1.0)
    if not _is_number(weight) or not math.isfinite(weight) or weight <= 0:
        raise fail("weight", "weight must be a number > 0")
    limits = {}
    for name in LIMIT_FIELDS:
        if name in body:
            v = body[name]
            ok = _is_number(v) and math.isfinite(v) and v > 0 and (name not in INTEGER_LIMITS or float(v).is_integer())
            if not ok:
                kind = "a positive integer" if name in INTEGER_LIMITS else "a positive number"
                raise fail(name, f"{name} must be {kind}")
            limits[name] = int(v) if name in INTEGER_LIMITS else float(v)
    lo, hi = _priority_range(body, fail)
    default_priority = body.get("default_priority", min(max(0, lo), hi))
    if not isinstance(default_priority, int) or isinstance(default_priority, bool) or not lo <= default_priority <= hi:
        raise fail("default_priority", f"default_priority must be an integer in priority_range [{lo}, {hi}]")
    shared = body.get("shared_prefixes", [])
    if not isinstance(shared, list) or not all(isinstance(s, str) for s in shared):
        raise fail("shared_prefixes", "shared_prefixes must be a list of names")
    for s in shared:
        if s not in prefixes:
            raise fail(None, f"shared prefix {s!r} is not defined (add [shared_prefixes.{s}])", needle=s)
    salt = body.get("salt")
    if salt is not None and (not isinstance(salt, str) or len(salt) < 8):
        raise fail("salt", "salt must be a string of at least 8 characters")
    digests = frozenset(digests)
    return TenantConfig(tid, digests, float(weight), salt or default_salt(tid, digests), (lo, hi), default_priority,
                        Limits(**limits), tuple(shared))


def _priority_range(body, fail) -> tuple[int, int]:
    pr = body.get("priority_range", [0, 0])
    if (not isinstance(pr, list) or len(pr) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) for p in pr)
            or pr[0] > pr[1]):
        raise fail("priority_range", "priority_range must be [low, high], two integers with low <= high")
    return pr[0], pr[1]


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
