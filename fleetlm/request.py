"""The engine core's record of one request (one sample: ``n>1`` is fanned out before the core)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from fleetlm.sampling_params import SamplingParams


@dataclass(frozen=True)
class Tenancy:
    """Who a request belongs to, for fair scheduling and cache isolation (``fleetlm/tenancy``).

    ``cache_salt`` is a digest (never a tenant's secret or API key): it goes into the hash of the
    request's first private block, so the whole hash chain after it is private to that salt.
    The first ``shared_prefix_tokens`` prompt tokens (a public, named prefix the tenant opted in
    to) are hashed under ``shared_salt`` instead, so every tenant sharing it hits the same blocks.
    """

    tenant_id: str = ""  # "" = no tenant (a server without --tenants, or the offline engine)
    weight: float = 1.0  # the tenant's fair share (fair scheduling policy)
    priority: int = 0  # lower runs first within a tenant (as vLLM's priority)
    cache_salt: str | None = None
    shared_prefix_tokens: int = 0
    shared_salt: str | None = None


NO_TENANCY = Tenancy()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    WAITING_FOR_KV = "waiting_for_kv"  # its prompt's K/V is being received from a producer (fleetlm/disagg)
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass(eq=False)
class Request:
    """Mutable state of one sequence inside the engine core.

    Invariant: ``num_computed_tokens <= num_tokens``; the first ``num_computed_tokens`` of prompt + output
    have their K/V in the blocks the KV cache manager holds for this request.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()  # any of these ends the sequence (unless ignore_eos)
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache at first schedule
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # stable digests of full blocks, in order
    first_scheduled_time: float | None = None
    tenancy: Tenancy = NO_TENANCY
    lora_name: str | None = None  # the LoRA adapter it runs with (fleetlm/lora); part of every block hash
    kv_transfer_params: dict | None = None  # disaggregated prefill/decode (fleetlm/disagg/connector.py)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output without concatenating the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def max_tokens(self) -> int:
        assert self.sampling_params.max_tokens is not None
        return self.sampling_params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished
