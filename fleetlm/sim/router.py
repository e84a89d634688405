"""Router policies of the simulated fleet.

- ``round_robin``: request ``i`` of a pool goes to replica ``i mod N``.
- ``least_load``: the replica with the fewest unfinished requests (ties: the next one after the
  previous choice, so equal replicas take turns).
- ``prefix`` (approximate, like a cache-aware router that sees no KV events): remember which
  replica last served each prefix key (a session, else a prefix group); send the request there
  unless that replica is overloaded (more than ``BALANCE_ABS`` requests and ``BALANCE_REL``
  times the least loaded one), else to the least loaded. Requests without a key: least load.
  The memory is bounded (``MAX_KEYS``, oldest forgotten first), and it is never told about
  evictions, so it can send a request where its prefix is no longer cached: approximate.
"""

from __future__ import annotations

POLICIES = ("round_robin", "least_load", "prefix")
BALANCE_ABS = 8
BALANCE_REL = 1.5
MAX_KEYS = 1 << 20


class Router:
    def __init__(self, policy: str, num_replicas: int) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown router policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if num_replicas < 1:
            raise ValueError(f"a pool needs at least one replica, got {num_replicas}")
        self.policy = policy
        self.n = num_replicas
        self._next = 0
        self._owner: dict[int, int] = {}

    def pick(self, key: int | None, loads: list[int]) -> int:
        if self.policy == "round_robin":
            r = self._next
            self._next = (r + 1) % self.n
            return r
        if self.policy == "prefix" and key is not None:
            r = self._owner.get(key)
            if r is None or not self._balanced(loads[r], min(loads)):
                r = self._least(loads)
            self._remember(key, r)
            return r
        return self._least(loads)

    def _least(self, loads: list[int]) -> int:
        n, start = self.n, self._next
        best, best_load = start, loads[start]
        for j in range(1, n):
            r = (start + j) % n
            if loads[r] < best_load:
                best, best_load = r, loads[r]
        self._next = (best + 1) % n
        return best

    @staticmethod
    def _balanced(load: int, lowest: int) -> bool:
        return load <= lowest + BALANCE_ABS or load <= lowest * BALANCE_REL

    def _remember(self, key: int, r: int) -> None:
        owner = self._owner
        owner.pop(key, None)
        owner[key] = r
        if len(owner) > MAX_KEYS:
            del owner[next(iter(owner))]
