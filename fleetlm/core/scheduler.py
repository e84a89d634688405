"""The scheduler: one token budget per step, running requests first, then waiting ones FCFS.

There are no prefill and decode phases. Each request asks for ``num_tokens -
num_computed_tokens`` tokens (a whole prompt, a chunk of it, or the one new token of a decode),
capped by what is left of the step's budget; chunked prefill is that cap. Running requests are
served first, so decodes never wait behind a long prompt. When the KV pool runs dry, the most
recently admitted running request is preempted (its blocks freed, to be recomputed) and goes
back to the head of the waiting queue.

Steps in flight: with pipeline parallelism the engine keeps up to ``pp`` steps running at once.
A request scheduled in a step stays *in flight* until ``update_from_output`` of that step; it is
never scheduled again, nor preempted, before that (its next token is not known yet). So that the
stages overlap, a step then takes at most ``ceil(requests / pp)`` requests: the requests settle
into ``pp`` groups that take turns, one group per stage.
"""

from __future__ import annotations

import time

from fleetlm.config import CacheConfig, SchedulerConfig
from fleetlm.core.fair_queue import WaitingQueue, make_waiting_queue
from fleetlm.core.kv_cache_manager import KVCacheManager
from fleetlm.core.sched_output import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from fleetlm.metrics.stats import SchedulerStats
from fleetlm.request import Request, RequestStatus


class KVCacheCapacityError(ValueError):
    """The request needs more KV blocks than the whole cache has: it can never run here."""


def check_request_fits(num_prompt: int, max_tokens: int, max_model_len: int, cache: CacheConfig) -> None:
    """Raise ``ValueError`` (``KVCacheCapacityError`` for the KV limit) naming the limit a
    request of this shape can never fit."""
    if num_prompt == 0:
        raise ValueError("the prompt is empty: at least one token is required")
    total = num_prompt + max_tokens
    if total > max_model_len:
        raise ValueError(
            f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
            f"max_model_len ({max_model_len}); shorten the prompt or lower max_tokens"
        )
    need, have = -(-total // cache.block_size), cache.num_blocks
    if need > have:
        raise KVCacheCapacityError(
            f"request needs {need} KV blocks ({total} tokens) but the whole KV cache has "
            f"{have} blocks ({cache.max_tokens} tokens); it can never fit"
        )


class Scheduler:
    def __init__(self, sched: SchedulerConfig, cache: CacheConfig) -> None:
        self.config = sched
        self.cache_config = cache
        self.kv = KVCacheManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: WaitingQueue = make_waiting_queue(sched.scheduling_policy)  # fcfs | fair (fair_queue.py)
        self.running: list[Request] = []
        self._on_workers: dict[str, int] = {}  # requests whose state the workers hold -> output tokens they have
        self._in_flight: set[str] = set()  # scheduled in a step whose output has not come back
        self._next_step_id = 0
        self._finished_ids: set[str] = set()  # to tell the workers next step
        self.num_preemptions = 0
        self.num_adds_seen = 0
        self.num_tokens_seen = 0
        self.spec = None  # SpecScheduler (fleetlm/spec_decode/scheduling.py) when speculation is on
        self.on_finish = None  # KV connector hook (fleetlm/disagg): (req) before its blocks are freed

    # -- admission ----------------------------------------------------------------------------
    def check_request(self, req: Request) -> None:
        """Raise ``ValueError`` if ``req`` can never run here (checked before it is queued)."""
        check_request_fits(req.num_prompt_tokens, req.max_tokens, self.config.max_model_len, self.cache_config)

    def add_request(self, req: Request) -> None:
        self.check_request(req)
        if req.request_id in self.requests or req.request_id in self._in_flight:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)
        self.num_adds_seen += 1
        self.num_tokens_seen += req.num_prompt_tokens

    def add_waiting_for_kv(self, req: Request) -> None:
        """Admit a request whose prompt K/V comes from another engine (``fleetlm/disagg``): it
        is known (abortable, counted) but waits outside the queue until ``kv_arrived``."""
        self.check_request(req)
        if req.request_id in self.requests or req.request_id in self._in_flight:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        req.status = RequestStatus.WAITING_FOR_KV
        self.num_adds_seen += 1
        self.num_tokens_seen += req.num_prompt_tokens

    def kv_arrived(self, req: Request, num_computed: int, num_cached: int) -> None:
        """Its first ``num_computed`` tokens have K/V in its blocks: it runs from there."""
        req.num_computed_tokens = num_computed
        req.num_cached_tokens = num_cached
        req.status = RequestStatus.RUNNING
        req.first_scheduled_time = req.first_scheduled_time or time.monotonic()
        self.running.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        kv, n = self.kv, self.cache_config.num_blocks
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_waiting_tokens=sum(r.num_tokens - r.num_computed_tokens for r in self.waiting),
            kv_cache_usage=1.0 - kv.num_free_blocks / n,
            num_free_blocks=kv.num_free_blocks,
            num_blocks=n,
            prefix_queries=kv.stats.queries,
            prefix_hits=kv.stats.hits,
            num_preemptions=self.num_preemptions,
            num_adds_seen=self.num_adds_seen,
            num_tokens_seen=self.num_tokens_seen,
            tenant_preemptions=dict(self.waiting.preemptions) or None,
            **(self.spec.stats.as_scheduler_stats() if self.spec is not None else {}),
        )

    def split_step(self, so: SchedulerOutput, withdrawn: set[int] = frozenset()) -> list[SchedulerOutput]:
        """After ``so`` failed in the workers: the same work as one step per request, each
        rebuilding its request's worker state from scratch (the failed step may have left it
        half-updated), so a request that fails again fails alone. A request whose prefix hit
        blocks of ``withdrawn`` (inserted by that step, never written) recomputes from the
        first of them. Requests aborted meanwhile are skipped."""
        bs, subs = self.cache_config.block_size, []
        for rid, n in so.num_scheduled_tokens.items():
            req = self.requests.get(rid)
            if req is None:
                continue
            if self.spec is not None:  # the sub-step recomputes without the failed step's drafts
                k = self.spec.take_scheduled(rid)
                req.num_computed_tokens, n = req.num_computed_tokens - k, n - k
            before = req.num_computed_tokens - n
            blocks = self.kv.block_ids(rid)
            unwritten = [i * bs for i, b in enumerate(blocks) if b in withdrawn and i * bs < before]
            start = min(unwritten, default=before)
            req.num_computed_tokens = start  # as before the step: the worker recomputes from here
            data = self.new_request_data(rid)
            self._on_workers[rid] = len(req.output_token_ids)
            n += before - start
            req.num_computed_tokens = start + n
            subs.append(SchedulerOutput([data], [], {rid: n}, n, finished_req_ids={rid}, step_id=so.step_id))
        return subs

    def new_request_data(self, rid: str) -> NewRequestData:
        """Everything a worker needs to (re)build its state for ``rid``."""
        req = self.requests[rid]
        return NewRequestData(rid, req.prompt_token_ids, list(req.output_token_ids), req.sampling_params,
                              self.kv.block_ids(rid), req.num_computed_tokens, req.lora_name)

    # -- one step -------------------------------------------------------------------------------
    def has_schedulable(self) -> bool:
        """Could ``schedule`` give work now (some request not already in flight)?"""
        return bool(self.waiting) or any(r.request_id not in self._in_flight for r in self.running)

    def schedule(self) -> SchedulerOutput:
        step_id = self._next_step_id
        self.kv.begin_step(step_id)
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted = False

        cap = self._requests_per_step()
        i = 0
        while i < len(self.running) and budget > 0 and len(num_scheduled) < cap:
            req = self.running[i]
            if req.request_id in self._in_flight:
                i += 1
                continue
            drafts = self.spec.drafts_for(req, budget, self.config.max_model_len) if self.spec else []
            n = min(req.num_tokens - req.num_computed_tokens, budget) + len(drafts)
            look = self.spec.lookahead(req, req.num_computed_tokens + n) if self.spec else 0
            new_blocks = self.kv.allocate_slots(req, n, num_lookahead_tokens=look)
            while new_blocks is None:
                victim = self._pick_victim(i)
                if victim is None:
                    break
                self.running.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                new_blocks = self.kv.allocate_slots(req, n, num_lookahead_tokens=look)
            if new_blocks is None:
                break
            self._record(req, n, new_blocks, new_reqs, cached_reqs, drafts)
            num_scheduled[req.request_id] = n
            budget -= n
            i += 1

        while (self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs
               and len(num_scheduled) < cap):
            req = self.waiting[0]
            hits, num_hit = self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - num_hit, budget)
            look = self.spec.lookahead(req, num_hit + n) if self.spec else 0
            new_blocks = self.kv.allocate_slots(req, n, hits, num_lookahead_tokens=look)
            if new_blocks is None:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            req.first_scheduled_time = req.first_scheduled_time or time.monotonic()
            self.running.append(req)
            self._record(req, n, new_blocks, new_reqs, cached_reqs)
            num_scheduled[req.request_id] = n
            budget -= n

        for req_id, n in num_scheduled.items():
            self.requests[req_id].num_computed_tokens += n
        self.kv.seal_step()
        if not num_scheduled:  # nothing to run: workers learn about finished requests next time
            return SchedulerOutput([], [], {}, 0, step_id=step_id)
        self._next_step_id += 1
        self._in_flight.update(num_scheduled)
        out = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_req_ids=self._finished_ids,
            step_id=step_id,
            num_spec_tokens=self.spec.step_k(len(self.running)) if self.spec else 0,
        )
        self._finished_ids = set()
        return out

    def _requests_per_step(self) -> int:
        """All of them with one stage; with ``pp`` steps in flight, a ``1/pp`` share each."""
        pp = self.config.max_concurrent_batches
        if pp == 1:
            return self.config.max_num_seqs
        live = len(self.running) + min(len(self.waiting), self.config.max_num_seqs - len(self.running))
        return max(1, -(-live // pp))

    def _pick_victim(self, first: int) -> Request | None:
        """The policy's choice among the running requests from index ``first`` on that are not in
        flight (requests before ``first`` are already in this step); FCFS: the most recently
        admitted of the lowest priority."""
        return self.waiting.pick_victim([r for r in self.running[first:] if r.request_id not in self._in_flight])

    def _record(self, req: Request, n: int, new_blocks, new_reqs, cached_reqs, drafts: list[int] = ()) -> None:
        rid = req.request_id
        self.waiting.charge(req, n)  # the policy's service accounting (fair share)
        seen = self._on_workers.get(rid)
        if seen is not None:
            new_tokens = req.output_token_ids[seen:]
            self._on_workers[rid] = len(req.output_token_ids)
            cached_reqs.append(CachedRequestData(rid, [b.block_id for b in new_blocks], req.num_computed_tokens,
                                                 new_tokens, list(drafts)))
            if self.spec is not None:
                self.spec.on_scheduled(rid, len(drafts))
            return
        self._on_workers[rid] = len(req.output_token_ids)
        new_reqs.append(self.new_request_data(rid))

    def _preempt(self, req: Request) -> None:
        if self.spec is not None:
            self.spec.forget(req.request_id)
        self.kv.free(req)
        self._forget_on_workers(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _forget_on_workers(self, req_id: str) -> None:
        if req_id in self._on_workers:
            del self._on_workers[req_id]
            self._finished_ids.add(req_id)

    # -- results --------------------------------------------------------------------------------
    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        self._in_flight.difference_update(sched.num_scheduled_tokens)
        outputs: list[EngineCoreOutput] = []
        for rid, msg in result.errors.items():
            req = self.requests.get(rid)
            if req is not None and not req.is_finished:
                self._finish(req, RequestStatus.FINISHED_ERROR)
                outputs.append(EngineCoreOutput(rid, [], "error", error=msg))
        for rid, tokens in zip(result.req_ids, result.sampled_token_ids):
            req = self.requests.get(rid)
            if req is None or req.is_finished or req.status != RequestStatus.RUNNING:
                continue
            prompt_lps = result.prompt_logprobs.get(rid)
            if self.spec is not None:  # rejected drafts come off num_computed_tokens
                self.spec.on_output(req, tokens, result.spec_token_ids.get(rid))
            if not tokens and prompt_lps is None:
                continue
            kept = 0
            for t in tokens:
                req.output_token_ids.append(t)
                kept += 1
                if self._check_stop(req, t):
                    break
            lps = result.logprobs.get(rid)
            outputs.append(
                EngineCoreOutput(
                    rid, tokens[:kept],  # none past a stop (several tokens per step when speculating)
                    finish_reason=req.status.value if req.is_finished else None,
                    stop_reason=req.stop_reason,
                    new_logprobs=lps[:kept] if lps is not None else None,
                    prompt_logprobs=prompt_lps,
                    num_cached_tokens=max(req.num_cached_tokens, 0),
                    first_scheduled_time=req.first_scheduled_time,
                )
            )
            if req.is_finished:
                self._finish(req, req.status)
        return outputs

    def _check_stop(self, req: Request, token: int) -> bool:
        sp = req.sampling_params
        if req.num_output_tokens > sp.min_tokens:  # EOS/stop ids are masked before min_tokens
            if not sp.ignore_eos and token in req.eos_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                return True
            if token in sp.stop_token_ids:
                req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
                return True
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if self.spec is not None:
            self.spec.forget(req.request_id)
            self.spec.take_scheduled(req.request_id)
        if self.on_finish is not None:
            self.on_finish(req, status)
        req.status = status
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.kv.free(req)
        self._forget_on_workers(req.request_id)
        self.waiting.forget(req)
        del self.requests[req.request_id]

    def finish_requests(self, req_ids, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> list[str]:
        """Abort (or otherwise end) requests from outside; returns the ids that were live."""
        done = []
        for rid in [req_ids] if isinstance(req_ids, str) else req_ids:
            req = self.requests.get(rid)
            if req is not None:
                self._finish(req, status)
                done.append(rid)
        return done
