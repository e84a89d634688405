"""Messages between the scheduler and the workers. Plain data, no engine objects, so the same
``SchedulerOutput`` can be sent to every tensor/pipeline-parallel worker process.

Workers never decide a request's tokens themselves: sampled tokens come back to the scheduler,
which sends each worker the ones it has not seen (``CachedRequestData.new_token_ids``). So every
rank and every pipeline stage holds the same token history, whichever rank sampled."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetlm.sampling_params import SamplingParams
from fleetlm.structured.bitmask import GrammarBitmask


@dataclass(frozen=True)
class NewRequestData:
    """A request the workers have not seen (or must rebuild after a preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when resuming after preemption
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    lora_name: str | None = None  # the LoRA adapter its tokens run through (fleetlm/lora)


@dataclass(frozen=True)
class CachedRequestData:
    """A request the workers already hold: only what changed."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    new_token_ids: list[int] = field(default_factory=list)  # sampled since the workers last saw it
    spec_token_ids: list[int] = field(default_factory=list)  # drafts to verify this step (after the known tokens)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to compute this step
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)  # workers drop their state
    step_id: int = 0  # increasing; steps in flight at once (pipeline parallel) finish in this order
    num_spec_tokens: int = 0  # drafts each request may get proposed after this step (speculative decoding)
    grammar: GrammarBitmask | None = None  # allowed next tokens of the rows that sample under a grammar

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely token
    decoded_token: str | None = None


# token id -> Logprob, one dict per position
PositionLogprobs = dict[int, Logprob]


@dataclass
class ModelRunnerOutput:
    """What one step produced: per request, the sampled tokens (empty for a partial prefill)."""

    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PositionLogprobs | None]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # req_id -> why it failed alone
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)  # req_id -> drafts for its next step


@dataclass
class EngineCoreOutput:
    """One request's news from one engine step, sent to the output processor."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    new_logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    first_scheduled_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
