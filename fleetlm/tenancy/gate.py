"""Admission of one HTTP request's engine requests under its tenant's rules, and the stream
wrapper that accounts for them until they end.

Invariant: every admitted request releases its quota exactly once (when its last stream
closes; every exit path of a handler closes its streams), and a request refused by the engine
after admission gets its quota back.
"""

from __future__ import annotations

from collections.abc import Callable

from fleetlm.outputs import RequestOutput
from fleetlm.request import Tenancy
from fleetlm.tenancy.admission import RequestContext, tenancy_for
from fleetlm.tenancy.metrics import TenantMetrics
from fleetlm.tenancy.quota import QuotaExceeded, TenantState, Usage
from fleetlm.tenancy.registry import TenantRegistry

__all__ = ["QuotaExceeded", "TenantGate", "TenantStream"]


class TenantStream:
    """Wraps a ``RequestStream``: counts generated tokens into the tenant's tokens/min bucket as
    they are streamed, records per-tenant metrics when it finishes, releases quota on close."""

    def __init__(self, inner, tenant: str, state: TenantState | None, usage: Usage | None,
                 metrics: TenantMetrics | None, stream: bool) -> None:
        self.inner, self.tenant, self.state, self.usage, self.metrics = inner, tenant, state, usage, metrics
        self.stream = stream
        self._seen: dict[int, int] = {}  # sample index -> tokens already counted (non-stream outputs are cumulative)
        self.closed = False
        if usage is not None:
            usage.open_streams += 1

    @property
    def request_id(self) -> str:
        return self.inner.request_id

    def __aiter__(self) -> TenantStream:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            out = await self.inner.__anext__()
        except BaseException:
            self.close()
            raise
        self._account(out)
        return out

    def _account(self, out: RequestOutput) -> None:
        new = 0
        for c in out.outputs:
            n = len(c.token_ids)
            if self.stream:
                new += n
            else:
                new += max(0, n - self._seen.get(c.index, 0))
                self._seen[c.index] = max(n, self._seen.get(c.index, 0))
        if self.state is not None:
            self.state.spend_output(new)
        if self.metrics is not None:
            self.metrics.on_tokens(self.tenant, new)
            if out.finished:
                self.metrics.on_finished(self.tenant, out)

    def close(self) -> None:
        self.inner.close()
        if not self.closed:
            self.closed = True
            if self.usage is not None:
                self.usage.stream_closed()


class TenantGate:
    """What ``OpenAIServing.start`` calls: quota, ``Tenancy`` per prompt, wrapped streams."""

    def __init__(self, registry: TenantRegistry | None, metrics: TenantMetrics | None,
                 started: Callable[[str], bool] | None = None) -> None:
        self.registry, self.metrics, self.started = registry, metrics, started

    def check_size(self, ctx: RequestContext, num_prompt_tokens: int, num_seqs: int) -> None:
        if ctx.tenant is not None and self.registry is not None:
            self.registry.state(ctx.tenant.tenant_id).check_size(num_prompt_tokens, num_seqs)

    def start(self, ctx: RequestContext, prompts: list[tuple[str, list[int]]], n: int, stream: bool,
              add: Callable[[str, Tenancy], object]) -> list[TenantStream]:
        """Admit ``prompts`` (engine request id, prompt ids), each with ``n`` samples: quota first
        (``QuotaExceeded``, nothing taken), then ``add(request_id, tenancy)`` for each; if any add
        raises, everything is closed and the quota refunded."""
        tid = ctx.tenant.tenant_id if ctx.tenant is not None else ""
        num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        state = usage = None
        if ctx.tenant is not None and self.registry is not None:
            state = self.registry.state(tid)
            state.started = self.started
            try:
                usage = state.admit(num_prompt_tokens, {rid: n for rid, _ in prompts})
            except QuotaExceeded:
                if self.metrics is not None:
                    self.metrics.on_rate_limited(tid)
                raise
        streams: list[TenantStream] = []
        try:
            for rid, ids in prompts:
                inner = add(rid, tenancy_for(ctx, ids))
                streams.append(TenantStream(inner, tid, state, usage, self.metrics, stream))
        except BaseException as e:
            for s in streams:
                s.close()
            if state is not None and usage is not None:
                state.refund(usage, num_prompt_tokens)
            if self.metrics is not None and type(e).__name__ == "QueueFullError":  # the engine's queue: also a 429
                self.metrics.on_rate_limited(tid)
            raise
        if self.metrics is not None:
            for _, ids in prompts:
                self.metrics.on_admitted(tid, n, len(ids))
        return streams
