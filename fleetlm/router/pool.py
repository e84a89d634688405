"""The replicas behind the router: membership, active health checks, KV-event subscribers, and
the routing call that applies the policy to the routable ones.

Locking rule: everything here runs on the router's event loop; nothing is shared with threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp

from fleetlm.router.config import RouterConfig, WorkerSpec
from fleetlm.router.kv_index import KVEventSubscriber, KVIndex
from fleetlm.router.metrics import RouterMetrics
from fleetlm.router.policies import Decision, RouteKey, make_policy
from fleetlm.router.replica import CircuitBreaker, Replica

logger = logging.getLogger("fleetlm.router")
KV_USAGE_METRIC = "fleetlm:kv_cache_usage_perc"


class WorkerError(ValueError):
    """A bad admin request about a worker (HTTP 4xx); ``status`` says which."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ReplicaPool:
    def __init__(self, config: RouterConfig, metrics: RouterMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.replicas: dict[str, Replica] = {}
        self.index = KVIndex()
        self.policy = make_policy(config.policy, config.policy_config, self.index.matched_blocks)
        self._subs: dict[str, KVEventSubscriber] = {}
        self._session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task | None = None
        self.wants_load = config.policy in ("least_load", "prefix", "session")

    # -- life cycle ---------------------------------------------------------------------------------
    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        for w in self.config.workers:
            self._add(w)
        self._health_task = asyncio.create_task(self._health_loop(), name="router-health")

    async def wait_all_healthy(self, timeout: float) -> list[str]:
        """URLs of the workers still unhealthy after ``timeout`` seconds (empty: all came up)."""
        deadline = time.monotonic() + timeout
        while True:
            down = [r.url for r in self.replicas.values() if not r.healthy]
            if not down or time.monotonic() >= deadline:
                return down
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        for sub in list(self._subs.values()):
            await sub.stop()

    # -- membership ---------------------------------------------------------------------------------
    def _add(self, w: WorkerSpec) -> Replica:
        rep = Replica(w.url, w.kv_events_endpoint,
                      CircuitBreaker(self.config.breaker_failures, self.config.breaker_cooldown))
        self.replicas[w.url] = rep
        if w.kv_events_endpoint is not None:
            sub = KVEventSubscriber(self.index, w.url, w.kv_events_endpoint)
            sub.start()
            self._subs[w.url] = sub
        return rep

    def track(self, w: WorkerSpec) -> Replica:
        """Add a worker that may still be starting: the health loop puts it in rotation when
        its check passes (a cluster controller adds restarted replicas this way)."""
        if w.url in self.replicas:
            raise WorkerError(f"worker {w.url} is already in the pool", 409)
        return self._add(w)

    async def add_worker(self, w: WorkerSpec) -> Replica:
        """Add a worker at run time; it must pass a health check within ``add_timeout``."""
        if w.url in self.replicas:
            raise WorkerError(f"worker {w.url} is already in the pool", 409)
        rep = self._add(w)
        deadline = time.monotonic() + self.config.add_timeout
        while not await self._check(rep):
            if time.monotonic() >= deadline:
                await self.remove_worker(w.url)
                raise WorkerError(f"worker {w.url} did not pass its health check within "
                                  f"{self.config.add_timeout:g} s", 422)
            await asyncio.sleep(min(0.2, self.config.health_interval))
        logger.info("worker %s added", w.url)
        return rep

    async def remove_worker(self, url: str) -> None:
        rep = self.replicas.pop(url, None)
        if rep is None:
            raise WorkerError(f"worker {url} is not in the pool", 404)
        rep.removed = True  # requests already on it finish; no new ones go there
        self.policy.forget(url)
        self.metrics.forget(url)
        sub = self._subs.pop(url, None)
        if sub is not None:
            await sub.stop()

    # -- health -------------------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            reps = list(self.replicas.values())
            await asyncio.gather(*(self._check(r) for r in reps), return_exceptions=True)
            await asyncio.sleep(self.config.health_interval)

    def _headers(self) -> dict[str, str]:
        key = self.config.worker_api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _check(self, rep: Replica) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.config.health_timeout)
        try:
            async with self._session.get(rep.url + "/health/ready", timeout=timeout, headers=self._headers()) as resp:
                ok = resp.status == 200
            if ok and self.wants_load:
                rep.kv_usage = await self._kv_usage(rep, timeout)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            ok = False
        self._set_health(rep, ok)
        return ok

    async def _kv_usage(self, rep: Replica, timeout) -> float:
        async with self._session.get(rep.url + "/metrics", timeout=timeout, headers=self._headers()) as resp:
            if resp.status != 200:
                return rep.kv_usage
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith(KV_USAGE_METRIC):
                return float(line.rsplit(" ", 1)[1])
        return rep.kv_usage

    def _set_health(self, rep: Replica, ok: bool) -> None:
        if ok == rep.healthy:
            return
        rep.healthy = ok
        if ok:
            if rep.ever_healthy:  # it was down: whatever it cached may be gone
                self.policy.forget(rep.url)
            rep.ever_healthy = True
            rep.breaker.record_success()
            logger.info("worker %s is up", rep.url)
        else:
            logger.warning("worker %s is down (health check failed)", rep.url)

    # -- routing ------------------------------------------------------------------------------------
    def route(self, key: RouteKey, exclude: set[str]) -> Decision | None:
        """The policy's pick among routable replicas not in ``exclude`` (None: there is none)."""
        cands = [r for r in self.replicas.values() if r.url not in exclude and r.routable()]
        if not cands:
            return None
        d = self.policy.choose(key, cands)
        self.policy.on_routed(key, d.replica)
        d.replica.breaker.on_routed()
        self.metrics.on_decision(d.reason, d.matched)
        return d

    def describe(self) -> list[dict]:
        return [r.describe() for r in self.replicas.values()]
