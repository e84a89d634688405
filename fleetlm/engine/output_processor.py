"""Turns engine-core outputs into ``RequestOutput``s: detokenizes, applies stop strings (which
abort the request in the core), joins the ``n`` samples of a request, and keeps timings.

A request added with ``stream=True`` gets a *delta* ``RequestOutput`` every step it makes
progress: each ``CompletionOutput`` carries only the new text, token ids and logprobs of one
sample. While a sample runs, the last ``len(longest stop string) - 1`` characters are held back,
so text later cut by a stop string is never sent; the deltas concatenate to exactly the final
text of the same request without streaming.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Protocol

from fleetlm.core.sched_output import EngineCoreOutput
from fleetlm.engine.detokenizer import IncrementalDetokenizer
from fleetlm.metrics.stats import SchedulerStats
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
    sent_chars: int = 0  # stream: text, tokens and logprobs already handed out
    sent_tokens: int = 0
    sent_logprobs: int = 0
    sent_final: bool = False


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
    stream: bool = False
    stop_holdback: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())


class StatsSink(Protocol):
    """Where request-level timings and engine stats go (the Prometheus exporter implements it)."""

    def on_request_added(self, num_prompt_tokens: int) -> None: ...
    def on_scheduler_stats(self, stats: SchedulerStats) -> None: ...
    def on_first_token(self, ttft: float) -> None: ...
    def on_inter_token(self, gap: float) -> None: ...
    def on_new_tokens(self, n: int) -> None: ...
    def on_finished(self, out: RequestOutput) -> None: ...


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, sink: StatsSink | None = None) -> None:
        self.tokenizer = tokenizer
        self.sink = sink
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, str] = {}
        self._unrecorded: set[str] = set()  # requests kept out of the metrics (health probes)

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
            child_ids: list[str], arrival: float, stream: bool = False, record: bool = True) -> None:
        ps = ParentState(request_id, prompt, prompt_ids, params, RequestMetrics(arrival), stream=stream,
                         stop_holdback=max((len(s) for s in params.stop), default=1) - 1)
        if not record:
            self._unrecorded.add(request_id)
        for i, cid in enumerate(child_ids):
            want_lp = params.logprobs is not None
            ps.samples[cid] = SampleState(i, IncrementalDetokenizer(self.tokenizer, params, prompt_ids), [],
                                          [] if want_lp else None, 0.0 if want_lp else None)
            self.child_to_parent[cid] = request_id
        self.parents[request_id] = ps

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns (outputs to hand out: finished requests, plus deltas of streaming ones; child
        ids to abort in the core)."""
        now = time.monotonic()
        to_abort: list[str] = []
        touched: dict[str, tuple[ParentState, float | None]] = {}
        new_tokens = 0
        for o in outputs:
            pid = self.child_to_parent.get(o.request_id)
            if pid is None:
                continue
            ps = self.parents[pid]
            touched.setdefault(pid, (ps, ps.metrics.last_token_time))
            if pid not in self._unrecorded:
                new_tokens += len(o.new_token_ids)
            if self._apply(ps, ps.samples[o.request_id], o, now):
                to_abort.append(o.request_id)
        if new_tokens and self.sink is not None:
            self.sink.on_new_tokens(new_tokens)
        ready = []
        for pid, (ps, last_before) in touched.items():
            self._record_token_times(pid, ps, last_before)
            if ps.finished:
                ps.metrics.finished_time = now
                out = self._finish(pid)
                if self.sink is not None and pid not in self._unrecorded:
                    self.sink.on_finished(out)
                self._unrecorded.discard(pid)
                ready.append(self._delta(ps, out) if ps.stream else out)
            elif ps.stream:
                delta = self._delta(ps, None)
                if delta.outputs:
                    ready.append(delta)
        return ready, to_abort

    def _record_token_times(self, pid: str, ps: ParentState, last_before: float | None) -> None:
        m = ps.metrics
        if self.sink is None or pid in self._unrecorded or m.last_token_time == last_before:
            return  # no new token this step
        if last_before is None:
            self.sink.on_first_token(m.first_token_time - m.arrival_time)
        else:
            self.sink.on_inter_token(m.last_token_time - last_before)

    def _delta(self, ps: ParentState, final: RequestOutput | None) -> RequestOutput:
        """What each sample gained since the last delta (see the module docstring)."""
        outs = []
        for s in sorted(ps.samples.values(), key=lambda s: s.index):
            text = s.detok.text
            done = s.finish_reason is not None
            end = len(text) if done else max(s.sent_chars, len(text) - ps.stop_holdback)
            lps = s.logprobs[s.sent_logprobs :] if s.logprobs is not None else None
            out = CompletionOutput(s.index, text[s.sent_chars : end], s.token_ids[s.sent_tokens :],
                                   s.cumulative_logprob, lps, s.finish_reason, s.stop_reason)
            if out.text or out.token_ids or (done and not s.sent_final):
                outs.append(out)
            s.sent_chars, s.sent_tokens, s.sent_final = end, len(s.token_ids), done
            s.sent_logprobs = len(s.logprobs) if s.logprobs is not None else 0
        if final is not None:
            return replace(final, outputs=outs)
        return RequestOutput(ps.request_id, ps.prompt, ps.prompt_token_ids, outs, False, ps.metrics,
                             ps.prompt_logprobs, ps.num_cached_tokens, ps.error)

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
        self._unrecorded.discard(request_id)
        if ps is None:
            return []
        for cid in ps.samples:
            self.child_to_parent.pop(cid, None)
        return list(ps.samples)

    def has_unfinished(self) -> bool:
        return bool(self.parents)
