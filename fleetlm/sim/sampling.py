"""Simulating K of N identical replicas: which arrivals the K would receive.

Every replica of a pool runs the same scheduler on the same profile, so the fleet's latency
distribution is that of any replica's requests. The simulator therefore runs a sub-fleet of K
replicas (per pool) fed the share ``f = K / N`` of the arrivals that N replicas would send to
K of them, picked per router policy:

- ``round_robin``: arrival ``i`` goes to replica ``i mod N``; keeping ``i mod N < K`` and
  round-robin over the K reproduces exactly what replicas ``0..K-1`` of the full fleet see.
- ``prefix``: sessions are kept whole (a hash of the session id mod N < K), so every turn of a
  conversation stays in the sub-fleet; other requests (prefix groups included: a handful of
  groups cannot be split K of N) are thinned at random with probability f.
- ``least_load``: thinned at random with probability f (a Poisson stream stays Poisson), then
  balanced over the K. This is the one approximation: the full fleet balances over N, the
  sub-fleet over K, so queueing is modelled on a smaller pool (measured in RESULTS.md).

With prefill/decode pools of P and D replicas, K_p / P = K_d / D = f exactly (K_p and K_d are
multiples of P / gcd(P, D) and D / gcd(P, D)).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np

from fleetlm.sim.workload import Arrivals

_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class SubFleet:
    """How many replicas of each pool are simulated, of how many."""

    prefill_total: int  # 0: no P/D split
    decode_total: int  # all replicas when there is no split
    prefill: int
    decode: int

    @property
    def fraction(self) -> float:
        return self.decode / self.decode_total

    @property
    def front_total(self) -> int:
        """Replicas of the pool arrivals are routed to (prefill pool, or the whole fleet)."""
        return self.prefill_total or self.decode_total

    @property
    def front(self) -> int:
        return self.prefill or self.decode


def sub_fleet(replicas: int, prefill: int, sample: int | None) -> SubFleet:
    """``replicas`` in all, ``prefill`` of them prefill workers (0: none), simulating about
    ``sample`` replicas (None: all)."""
    if replicas < 1:
        raise ValueError(f"the fleet needs at least one replica, got {replicas}")
    decode = replicas - prefill
    if prefill < 0 or (prefill and decode < 1):
        raise ValueError(f"a P/D split needs >= 1 prefill and >= 1 decode replica, got {prefill} of {replicas}")
    if sample is not None and sample < 1:
        raise ValueError(f"--sample-replicas must be >= 1, got {sample}")
    if sample is None or sample >= replicas:
        return SubFleet(prefill, decode, prefill, decode)
    if not prefill:
        return SubFleet(0, decode, 0, sample)
    g = gcd(prefill, decode)
    up, ud = prefill // g, decode // g
    m = max(1, min(g, round(sample / (up + ud))))
    return SubFleet(prefill, decode, m * up, m * ud)


def _key_hash(keys: np.ndarray, n: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = (keys.astype(np.uint64) + np.uint64(1)) * _MIX
    return (h >> np.uint64(17)) % np.uint64(n)


def thin(arr: Arrivals, sf: SubFleet, policy: str, seed: int = 0) -> Arrivals:
    """The arrivals the simulated replicas of the front pool receive."""
    n_tot, k = sf.front_total, sf.front
    if k >= n_tot:
        return arr
    idx = np.arange(len(arr))
    if policy == "round_robin":
        keep = idx % n_tot < k
    else:
        keep = np.random.default_rng((seed, 0x5A3)).random(len(arr)) < k / n_tot
        if policy == "prefix":
            by_key = _key_hash(np.maximum(arr.session, 0), n_tot) < np.uint64(k)
            keep = np.where(arr.session >= 0, by_key, keep)
    return arr.take(np.flatnonzero(keep))
