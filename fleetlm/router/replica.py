"""One replica as the router sees it: its URL, health, circuit breaker and load.

Routable = healthy (the last active health check passed) and the breaker lets a request
through. ``in_flight`` is counted by the router itself (requests sent and not yet ended);
``kv_usage`` comes from the replica's ``/metrics`` on each health check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}


@dataclass
class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``cooldown_s`` one trial
    request goes through (half-open): success closes it, failure opens it again."""

    failure_threshold: int = 3
    cooldown_s: float = 5.0
    state: int = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False

    def allows(self, now: float | None = None) -> bool:
        """May a request be routed here now? (Does not take the half-open trial slot.)"""
        if self.state == CLOSED:
            return True
        now = time.monotonic() if now is None else now
        if self.state == OPEN and now - self.opened_at >= self.cooldown_s:
            self.state, self.trial_in_flight = HALF_OPEN, False
        return self.state == HALF_OPEN and not self.trial_in_flight

    def on_routed(self) -> None:
        if self.state == HALF_OPEN:
            self.trial_in_flight = True

    def record_success(self) -> None:
        self.state, self.failures, self.trial_in_flight = CLOSED, 0, False

    def record_failure(self, now: float | None = None) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
            self.state, self.opened_at, self.trial_in_flight = OPEN, time.monotonic() if now is None else now, False


@dataclass
class Replica:
    url: str
    kv_events_endpoint: str | None = None
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    healthy: bool = False
    in_flight: int = 0
    kv_usage: float = 0.0
    ever_healthy: bool = False
    removed: bool = False

    @property
    def name(self) -> str:
        return self.url

    def routable(self) -> bool:
        return self.healthy and not self.removed and self.breaker.allows()

    def describe(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "circuit": STATE_NAMES[self.breaker.state],
                "in_flight": self.in_flight, "kv_usage": self.kv_usage,
                "kv_events_endpoint": self.kv_events_endpoint}


def normalize_url(url: str) -> str:
    """``http://host:port`` without a trailing slash (ValueError if it is not an http URL)."""
    from urllib.parse import urlparse

    u = urlparse(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") or u.query:
        raise ValueError(f"worker URL must look like http://HOST:PORT, got {url!r}")
    return f"{u.scheme}://{u.netloc}"
