"""Routing policies: pick one replica for a request. Shared by ``fleetlm router`` (replicas are
HTTP servers) and the data-parallel front end (replicas are engine-core processes).

A policy sees replicas through ``ReplicaView`` (a name, requests in flight, KV usage) and a
request through ``RouteKey``; it returns a ``Decision`` (the replica, why, and how long a prefix
it expects to hit). Policies hold no locks: both callers run them on one event loop.

Tenant-aware routing hook: ``RouteKey.tenant`` carries the tenant a request belongs to (set by
the caller's ``tenant_of`` hook: the router's with ``--tenants``, else None). Tenant isolation
needs no policy of its own: in precise mode ``RouteKey.block_hashes`` are already salted per
tenant. A policy that wants the tenant registers with ``register_policy`` and reads it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fleetlm.router.radix import RadixTree


class ReplicaView(Protocol):
    name: str

    @property
    def in_flight(self) -> int: ...

    @property
    def kv_usage(self) -> float: ...


@dataclass(frozen=True)
class RouteKey:
    """What a policy may know about a request."""

    prefix: Sequence | None = None  # prompt text (router) or token-id tuple (data parallel)
    session: str | None = None  # sticky key: a header or the ``user`` field
    block_hashes: Sequence[bytes] | None = None  # the prompt's stable block hashes (precise prefix)
    block_size: int = 16
    tenant: str | None = None  # the tenant id with --tenants (see the module docstring)


@dataclass(frozen=True)
class Decision:
    replica: ReplicaView
    reason: str  # a metric label: round_robin | least_load | prefix_hit | prefix_miss | prefix_balance | session_*
    matched: int = 0  # expected prefix hit (elements of ``RouteKey.prefix``, or tokens in precise mode)


@dataclass(frozen=True)
class PolicyConfig:
    prefix_mode: str = "approximate"  # approximate | precise
    balance_abs_threshold: int = 8  # in-flight spread above which prefix routing balances instead
    balance_rel_threshold: float = 1.5  # ... and the busiest has this many times the least busy's load
    cache_threshold: float = 0.3  # minimum matched fraction of the prompt to follow a prefix
    tree_max_size: int = 1 << 22  # elements per replica's approximate tree
    seed: int = 0


class Policy:
    name = "base"

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    def choose(self, key: RouteKey, replicas: Sequence[ReplicaView]) -> Decision:
        raise NotImplementedError

    def on_routed(self, key: RouteKey, replica: ReplicaView) -> None:
        """The request was sent to ``replica`` (approximate prefix trees learn here)."""

    def forget(self, name: str) -> None:
        """``name`` left the pool (or came back empty): drop what was known about it."""


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self._n = itertools.count()

    def choose(self, key: RouteKey, replicas: Sequence[ReplicaView]) -> Decision:
        return Decision(replicas[next(self._n) % len(replicas)], "round_robin")


def _load(r: ReplicaView) -> tuple[int, float]:
    return (r.in_flight, r.kv_usage)


class LeastLoad(Policy):
    """Power of two choices: sample two replicas, take the one with fewer requests in flight
    (then lower KV usage). Near-optimal spread without a global scan."""

    name = "least_load"

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self._rng = random.Random(config.seed)

    def choose(self, key: RouteKey, replicas: Sequence[ReplicaView]) -> Decision:
        if len(replicas) == 1:
            return Decision(replicas[0], "least_load")
        a, b = self._rng.sample(range(len(replicas)), 2)
        ra, rb = replicas[a], replicas[b]
        return Decision(ra if _load(ra) <= _load(rb) else rb, "least_load")


class Session(Policy):
    """Sticky: the same session key goes to the same replica while it stays in the pool;
    requests without one (and new sessions) go to the least loaded."""

    name = "session"
    MAX_SESSIONS = 1 << 20

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self._owner: dict[str, str] = {}
        self._fallback = LeastLoad(config)

    def choose(self, key: RouteKey, replicas: Sequence[ReplicaView]) -> Decision:
        if key.session is not None:
            name = self._owner.get(key.session)
            for r in replicas:
                if r.name == name:
                    return Decision(r, "session_sticky")
        d = self._fallback.choose(key, replicas)
        return Decision(d.replica, "session_new" if key.session is not None else "least_load")

    def on_routed(self, key: RouteKey, replica: ReplicaView) -> None:
        if key.session is not None:
            if len(self._owner) >= self.MAX_SESSIONS:
                self._owner.pop(next(iter(self._owner)))  # oldest first
            self._owner[key.session] = replica.name

    def forget(self, name: str) -> None:
        self._owner = {s: n for s, n in self._owner.items() if n != name}


class Prefix(Policy):
    """Cache-aware: send a request where the longest prefix of its prompt already sits, unless
    the load is unbalanced (then least load wins: a hot prefix must not pile onto one replica).

    ``approximate``: a radix tree per replica of the prompts routed there. ``precise``: the
    replicas' own KV events (``matcher`` maps a replica name and block hashes to the number of
    leading blocks it holds)."""

    name = "prefix"

    def __init__(self, config: PolicyConfig, matcher: Callable[[str, Sequence[bytes]], int] | None = None) -> None:
        super().__init__(config)
        if config.prefix_mode not in ("approximate", "precise"):
            raise ValueError(f"prefix mode must be approximate or precise, got {config.prefix_mode!r}")
        if config.prefix_mode == "precise" and matcher is None:
            raise ValueError("precise prefix routing needs the replicas' KV events (an index to match against)")
        self.matcher = matcher
        self.trees: dict[str, RadixTree] = {}

    def _matched(self, key: RouteKey, r: ReplicaView) -> tuple[int, int]:
        """(matched, prompt length) in the mode's unit."""
        if self.config.prefix_mode == "precise":
            hashes = key.block_hashes or ()
            return self.matcher(r.name, hashes) * key.block_size, max(1, len(hashes) * key.block_size)
        tree = self.trees.get(r.name)
        n = len(key.prefix or ())
        return (tree.match(key.prefix) if tree is not None and key.prefix else 0), max(1, n)

    def choose(self, key: RouteKey, replicas: Sequence[ReplicaView]) -> Decision:
        loads = [r.in_flight for r in replicas]
        lo, hi = min(loads), max(loads)
        least = min(replicas, key=_load)
        if hi - lo > self.config.balance_abs_threshold and hi > self.config.balance_rel_threshold * lo:
            return Decision(least, "prefix_balance", self._matched(key, least)[0])
        best, best_n, total = least, -1, 1
        for r in replicas:
            n, total = self._matched(key, r)
            if n > best_n or (n == best_n and _load(r) < _load(best)):
                best, best_n = r, n
        if best_n > 0 and best_n / total >= self.config.cache_threshold:
            return Decision(best, "prefix_hit", best_n)
        return Decision(least, "prefix_miss", self._matched(key, least)[0])

    def on_routed(self, key: RouteKey, replica: ReplicaView) -> None:
        if self.config.prefix_mode == "approximate" and key.prefix:
            tree = self.trees.setdefault(replica.name, RadixTree(self.config.tree_max_size))
            tree.insert(key.prefix)

    def forget(self, name: str) -> None:
        self.trees.pop(name, None)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (RoundRobin, LeastLoad, Prefix, Session)}
DP_POLICIES = ("round_robin", "least_load", "prefix")  # the front end knows no sessions (HTTP does)


def register_policy(cls: type[Policy]) -> None:
    """Add a policy (e.g. a tenant-aware one) under ``cls.name``."""
    POLICIES[cls.name] = cls


def check_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return name


def check_dp_policy(name: str) -> str:
    if name not in DP_POLICIES:
        raise ValueError(f"data_parallel_policy must be one of {', '.join(DP_POLICIES)}, got {name!r} "
                         "(session stickiness is the router's: fleetlm router --policy session)")
    return name


def make_policy(name: str, config: PolicyConfig, matcher=None) -> Policy:
    cls = POLICIES[check_policy(name)]
    return cls(config, matcher) if cls is Prefix else cls(config)
