"""Per-tenant quotas: token buckets for requests/min and tokens/min, and counters for concurrent
and queued requests.

A bucket holds up to one minute's worth (``rate_per_minute``) and refills continuously. A request
takes one request token and its prompt tokens at admission; generated tokens are taken as they
are streamed, so the tokens bucket may go below zero and the next request waits until it refills.
``Retry-After`` is the time until the bucket holds what the refused request needs (whole seconds,
rounded up), so a client that waits that long is admitted (unless others spent it first).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleetlm.tenancy.config import Limits


class QuotaExceeded(Exception):
    """A tenant is over one of its limits: HTTP 429 with ``Retry-After``."""

    def __init__(self, tenant_id: str, limit: str, value: float, retry_after: int, detail: str) -> None:
        super().__init__(f"tenant {tenant_id!r} is over its {limit} limit ({value:g}): {detail}; "
                         f"retry after {retry_after} s")
        self.tenant_id, self.limit, self.retry_after = tenant_id, limit, retry_after


class TokenBucket:
    def __init__(self, rate_per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_minute
        self.capacity = rate_per_minute
        self.clock = clock
        self.level = rate_per_minute
        self._t = clock()

    def refill(self) -> float:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self._t) * self.rate / 60.0)
        self._t = now
        return self.level

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds ``amount`` (0 if it does now)."""
        return max(0.0, (amount - self.refill()) * 60.0 / self.rate)

    def take(self, amount: float) -> None:
        self.refill()
        self.level -= amount

    def set_rate(self, rate_per_minute: float) -> None:
        """A reload changed the limit: keep what was spent, clamp to the new capacity."""
        self.refill()
        self.rate = self.capacity = rate_per_minute
        self.level = min(self.level, rate_per_minute)


@dataclass(eq=False)
class Usage:
    """What one admitted HTTP request holds: a concurrency slot until its last stream closes,
    and queue places until each engine request has been scheduled (``started`` says so)."""

    state: TenantState
    pending: dict[str, int]  # engine request id -> sequences not yet started
    open_streams: int = 0
    released: bool = False

    def queued(self, started: Callable[[str], bool] | None) -> int:
        if started is not None:
            for rid in [r for r in self.pending if started(r)]:
                del self.pending[rid]
        return sum(self.pending.values())

    def stream_closed(self) -> None:
        self.open_streams -= 1
        if self.open_streams <= 0:
            self.state.release(self)


class TenantState:
    """A tenant's live counters; kept across reloads for a tenant id that stays."""

    def __init__(self, tenant_id: str, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.tenant_id = tenant_id
        self.clock = clock
        self.limits = Limits()
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.live: set[Usage] = set()  # admitted HTTP requests not yet released
        self.started: Callable[[str], bool] | None = None  # has this engine request sent its first output?
        self.apply(limits)

    def apply(self, limits: Limits) -> None:
        self.limits = limits
        self.requests = _bucket(self.requests, limits.requests_per_minute, self.clock)
        self.tokens = _bucket(self.tokens, limits.tokens_per_minute, self.clock)

    @property
    def concurrent(self) -> int:
        return len(self.live)

    @property
    def queued(self) -> int:
        return sum(u.queued(self.started) for u in self.live)

    def check_size(self, num_prompt_tokens: int, num_seqs: int) -> None:
        """``ValueError`` (400) if a request this size could never be admitted."""
        lim = self.limits
        if lim.tokens_per_minute is not None and num_prompt_tokens > lim.tokens_per_minute:
            raise ValueError(f"this request's {num_prompt_tokens} prompt tokens exceed the tenant's whole "
                             f"tokens_per_minute limit ({lim.tokens_per_minute:g}); it can never be admitted")
        if lim.max_queued_requests is not None and num_seqs > lim.max_queued_requests:
            raise ValueError(f"this request alone has {num_seqs} sequences, more than the tenant's "
                             f"max_queued_requests ({lim.max_queued_requests})")

    def admit(self, num_prompt_tokens: int, seqs: dict[str, int]) -> Usage:
        """Take the quota of a request of ``seqs`` (engine request id -> sequences), or raise
        ``QuotaExceeded`` having taken nothing."""
        num_seqs = sum(seqs.values())
        self.check_size(num_prompt_tokens, num_seqs)
        lim = self.limits
        if lim.max_concurrent_requests is not None and self.concurrent >= lim.max_concurrent_requests:
            raise QuotaExceeded(self.tenant_id, "max_concurrent_requests", lim.max_concurrent_requests, 1,
                                f"{self.concurrent} requests in flight")
        if lim.max_queued_requests is not None and (queued := self.queued) + num_seqs > lim.max_queued_requests:
            raise QuotaExceeded(self.tenant_id, "max_queued_requests", lim.max_queued_requests, 1,
                                f"{queued} sequences waiting to start")
        for bucket, need, name in ((self.requests, 1, "requests_per_minute"),
                                   (self.tokens, num_prompt_tokens, "tokens_per_minute")):
            if bucket is not None:
                wait = bucket.wait_for(need)
                if wait > 0:
                    raise QuotaExceeded(self.tenant_id, name, bucket.rate, max(1, math.ceil(wait)),
                                        f"{need:g} needed, {max(bucket.level, 0):.0f} left in the window")
        if self.requests is not None:
            self.requests.take(1)
        if self.tokens is not None:
            self.tokens.take(num_prompt_tokens)
        usage = Usage(self, dict(seqs))
        self.live.add(usage)
        return usage

    def spend_output(self, num_tokens: int) -> None:
        if self.tokens is not None and num_tokens:
            self.tokens.take(num_tokens)

    def refund(self, usage: Usage, num_prompt_tokens: int) -> None:
        """The engine refused the request after ``admit``: give everything back."""
        if self.requests is not None:
            self.requests.take(-1)
        if self.tokens is not None:
            self.tokens.take(-num_prompt_tokens)
        self.release(usage)

    def release(self, usage: Usage) -> None:
        if not usage.released:
            usage.released = True
            self.live.discard(usage)


def _bucket(old: TokenBucket | None, rate: float | None, clock) -> TokenBucket | None:
    if rate is None:
        return None
    if old is None:
        return TokenBucket(rate, clock)
    old.set_rate(rate)
    return old
