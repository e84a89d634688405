"""The server's configuration and life-cycle state, and its two health probes.

- Liveness (``GET /health``): the engine core's loop is alive and stepping. Cheap and never
  queued: with requests in flight, a core message in the last ``FRESH_S`` seconds is the answer;
  else one ping (an empty input batch, answered after the core's current step, so it also
  refreshes the stats), shared by concurrent probes. 503 while loading, if the model failed to load, if the engine process is gone, or if
  the ping goes unanswered for ``health_timeout`` seconds. Draining is still alive.
- Readiness (``GET /health/ready``): alive, and new work would be admitted now: loaded, not
  draining, the waiting queue below its bounds and the connections below ``max_connections``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetlm.engine.async_llm import AsyncLLM
from fleetlm.metrics.prometheus import PrometheusMetrics

LIVENESS_PATH, READINESS_PATH = "/health", "/health/ready"
HEALTH_PATHS = frozenset({LIVENESS_PATH, READINESS_PATH})
FRESH_S = 5.0  # under load, a core message younger than this proves the loop is stepping


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_keys: tuple[str, ...] = ()
    metrics_public: bool = False
    max_request_body_bytes: int = 1 << 20
    max_queued_requests: int | None = None
    max_queued_tokens: int | None = None
    request_timeout: float | None = None
    shutdown_timeout: float = 30.0
    health_timeout: float = 30.0  # liveness: how long the core's loop may take to answer a ping
    timeout_keep_alive: float = 10.0  # seconds a connection may stay idle or take to send a request
    max_connections: int | None = 1000  # open connections; a request on one more gets 503
    enable_docs: bool = False  # serve /docs, /redoc and /openapi.json
    tenants_file: str | None = None  # --tenants: API keys -> tenants, weights, limits (fleetlm/tenancy)
    allow_runtime_lora: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (fleetlm/lora)


@dataclass
class ServerState:
    config: ServerConfig
    engine: AsyncLLM
    metrics: PrometheusMetrics
    model_name: str
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    connection_count: Callable[[], int] = lambda: 0  # set once the HTTP server exists
    tenants: object | None = None  # the TenantRegistry with --tenants (fleetlm/tenancy/registry.py)
    _ping: asyncio.Task | None = field(default=None, repr=False)

    def refusal(self) -> tuple[int, str, str] | None:
        """Why new work must be refused now (status, message, code), or None."""
        if self.load_error is not None:
            return 503, f"the model failed to load: {self.load_error}", "load_failed"
        if not self.ready:
            return 503, "the model is still loading", "loading"
        if self.draining:
            return 503, "the server is shutting down", "draining"
        if self.engine.dead_reason is not None:
            return 503, f"the engine is not available: {self.engine.dead_reason}", "engine_dead"
        return None

    def gate(self, path: str) -> tuple[int, str, str] | None:
        """Why a request to ``path`` must be refused now, or None (probes and metrics always pass)."""
        if path in HEALTH_PATHS or path == "/metrics":
            return None
        return self.refusal()

    def over_connection_limit(self) -> bool:
        limit = self.config.max_connections
        return limit is not None and self.connection_count() > limit

    async def live(self) -> tuple[bool, str]:
        """Liveness (see the module docstring): (alive, status)."""
        refusal = self.refusal()
        if refusal is not None and refusal[2] != "draining":
            return False, refusal[1]
        status = "draining" if self.draining else "ok"
        last = self.engine.last_output_time
        if self.engine.num_inflight and last is not None and time.monotonic() - last < FRESH_S:
            return True, status
        if self._ping is None or self._ping.done():
            self._ping = asyncio.create_task(self.engine.ping(self.config.health_timeout))
        if await asyncio.shield(self._ping):
            return True, status
        why = self.engine.dead_reason or f"no answer within {self.config.health_timeout:g} s"
        return False, f"the engine loop is not stepping: {why}"

    async def readiness(self) -> tuple[bool, str]:
        """Readiness (see the module docstring): (ready, status)."""
        refusal = self.refusal()
        if refusal is not None:
            return False, refusal[1]
        alive, why = await self.live()
        if not alive:
            return False, why
        if self._queue_full():
            return False, "the waiting queue is full"
        if self.over_connection_limit():
            return False, f"at the connection limit ({self.config.max_connections})"
        return True, "ok"

    def _queue_full(self) -> bool:
        seqs, tokens = self.engine.queued()
        eng = self.engine
        return ((eng.max_queued_requests is not None and seqs >= eng.max_queued_requests)
                or (eng.max_queued_tokens is not None and tokens >= eng.max_queued_tokens))
