"""Plain-data statistics the engine core reports after every step (and when idle inputs arrive).

Counters are cumulative since start-up, so a lost or coalesced report loses nothing: the front
end exports the difference from the previous report.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm.moe.report import MoEReport


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int = 0  # sequences holding KV blocks and scheduled each step
    num_waiting: int = 0  # sequences queued for a first (or, after preemption, another) start
    num_waiting_tokens: int = 0  # tokens the waiting sequences still have to prefill
    kv_cache_usage: float = 0.0  # fraction of KV blocks held by live sequences (0..1)
    num_free_blocks: int = 0  # blocks no live sequence holds (cached-but-idle ones count as free)
    num_blocks: int = 0
    prefix_queries: int = 0  # cumulative prompt tokens looked up in the prefix cache (first admission only)
    prefix_hits: int = 0  # cumulative prompt tokens served from it instead of being computed
    num_preemptions: int = 0  # cumulative
    num_adds_seen: int = 0  # cumulative sequences received by the core (for front-end queue accounting)
    num_tokens_seen: int = 0  # cumulative prompt tokens of those sequences
    num_failed_steps: int = 0  # cumulative steps that raised and were retried one request at a time
    # speculative decoding, cumulative, vLLM's meanings: a draft is one request's run of draft tokens in one step
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()  # drafts whose token j (0-based) was accepted
    tenant_preemptions: dict[str, int] | None = None  # cumulative preemptions per tenant id (issue 15)
    moe: MoEReport | None = None  # per-expert routing counts, cumulative (fleetlm/moe/report.py)
