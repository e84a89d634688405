"""Turns engine-core outputs into ``RequestOutput``s: detokenizes, applies stop strings (which
abort the request in the core), joins the ``n`` samples of a request, and keeps timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from fleetlm.core.sched_output import EngineCoreOutput
from fleetlm.engine.detokenizer import IncrementalDetokenizer
from fleetlm.models.tokenizer import Tokenizer
from fleetlm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fleetlm.sampling_params import SamplingParams


@dataclass
class SampleState:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int]
    logprobs: list | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    samples: dict[str, SampleState] = field(default_factory=dict)  # child id -> state
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
            child_ids: list[str], arrival: float) -> None:
        ps = ParentState(request_id, prompt, prompt_ids, params, RequestMetrics(arrival))
        for i, cid in enumerate(child_ids):
            want_lp = params.logprobs is not None
            ps.samples[cid] = SampleState(i, IncrementalDetokenizer(self.tokenizer, params, prompt_ids), [],
                                          [] if want_lp else None, 0.0 if want_lp else None)
            self.child_to_parent[cid] = request_id
        self.parents[request_id] = ps

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns (outputs of requests that finished this step, child ids to abort in the core)."""
        now = time.monotonic()
        to_abort: list[str] = []
        touched: dict[str, ParentState] = {}
        for o in outputs:
            pid = self.child_to_parent.get(o.request_id)
            if pid is None:
                continue
            ps = self.parents[pid]
            touched[pid] = ps
            if self._apply(ps, ps.samples[o.request_id], o, now):
                to_abort.append(o.request_id)
        done = []
        for pid, ps in touched.items():
            if ps.finished:
                ps.metrics.finished_time = now
                done.append(self._finish(pid))
        return done, to_abort

    def _apply(self, ps: ParentState, s: SampleState, o: EngineCoreOutput, now: float) -> bool:
        """Fold one output into the sample; True if a stop string ended it (abort in the core)."""
        if o.prompt_logprobs is not None:
            ps.prompt_logprobs = [None if p is None else self._decoded(p) for p in o.prompt_logprobs]
        ps.num_cached_tokens = o.num_cached_tokens
        ps.metrics.first_scheduled_time = ps.metrics.first_scheduled_time or o.first_scheduled_time
        if o.error is not None:
            ps.error = o.error
        if o.new_token_ids:
            ps.metrics.first_token_time = ps.metrics.first_token_time or now
            ps.metrics.last_token_time = now
            if s.logprobs is not None and o.new_logprobs:
                s.logprobs.extend(self._decoded(p) for p in o.new_logprobs)
                for tok, pos in zip(o.new_token_ids, o.new_logprobs):
                    s.cumulative_logprob += pos[tok].logprob
        s.token_ids.extend(o.new_token_ids)
        text_ids = o.new_token_ids
        if o.finish_reason == "stop" and not ps.params.include_stop_str_in_output:
            text_ids = text_ids[:-1]  # the EOS / stop token that ended it is not part of the text
        delta = s.detok.add_tokens(text_ids)
        if o.finish_reason is not None:
            delta += s.detok.flush()
        if len(s.token_ids) > ps.params.min_tokens and s.detok.check_stop(len(delta)):
            s.finish_reason, s.stop_reason = "stop", s.detok.stop_reason
            return o.finish_reason is None  # still running in the core: abort it there
        if o.finish_reason is not None:
            s.finish_reason, s.stop_reason = o.finish_reason, o.stop_reason
        return False

    def _decoded(self, pos: dict) -> dict:
        return {t: replace(lp, decoded_token=self.tokenizer.decode([t], skip_special_tokens=False))
                for t, lp in pos.items()}

    def _finish(self, pid: str) -> RequestOutput:
        ps = self.parents.pop(pid)
        for cid in ps.samples:
            self.child_to_parent.pop(cid, None)
        outs = [
            CompletionOutput(s.index, s.detok.text, s.token_ids, s.cumulative_logprob,
                             s.logprobs, s.finish_reason, s.stop_reason)
            for s in sorted(ps.samples.values(), key=lambda s: s.index)
        ]
        return RequestOutput(pid, ps.prompt, ps.prompt_token_ids, outs, True, ps.metrics,
                             ps.prompt_logprobs, ps.num_cached_tokens, ps.error)

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns its child ids (to abort in the core)."""
        ps = self.parents.pop(request_id, None)
        if ps is None:
            return []
        for cid in ps.samples:
            self.child_to_parent.pop(cid, None)
        return list(ps.samples)

    def has_unfinished(self) -> bool:
        return bool(self.parents)
