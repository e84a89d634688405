"""Grammar state of the engine core's structured requests (the core's side; workers only see
bitmask rows in ``SchedulerOutput.grammar``).

A request with ``structured_outputs`` goes through:

1. ``add``: its grammar starts compiling on a worker thread and the request waits *here*, not
   in the scheduler, so no step ever waits for a compilation;
2. ``take_ready``: once compiled it gets a matcher and goes to the scheduler (a grammar that
   fails to compile ends that request alone with an error);
3. ``bitmask``: in every step where it samples, its row of allowed next tokens, filled from the
   matcher before the step runs;
4. ``accept``: the tokens the step produced advance its matcher (``rollback`` undoes tokens a
   speculative verifier rejected);
5. ``remove``: when it finishes or is aborted.

Invariant: a request's matcher has accepted exactly its output tokens so far, so its bitmask is
the set of tokens the grammar allows next. Preemption keeps output tokens, so it keeps the matcher.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fleetlm.request import Request
from fleetlm.structured.backend import GrammarCompilerPool, xgrammar
from fleetlm.structured.bitmask import GrammarBitmask

logger = logging.getLogger("fleetlm")


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.pool = GrammarCompilerPool(tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.waiting: dict[str, tuple[Request, cf.Future]] = {}
        self.matchers: dict[str, Any] = {}

    def add(self, req: Request) -> None:
        self.waiting[req.request_id] = (req, self.pool.submit(req.sampling_params.structured_outputs))

    def take_ready(self) -> tuple[list[Request], list[tuple[Request, str]]]:
        """Requests whose grammar is compiled (now with a matcher), and those whose failed."""
        ready: list[Request] = []
        failed: list[tuple[Request, str]] = []
        for rid, (req, fut) in list(self.waiting.items()):
            if not fut.done():
                continue
            del self.waiting[rid]
            try:
                compiled = fut.result()
            except Exception as e:  # noqa: BLE001 - this request fails alone
                failed.append((req, str(e)))
                continue
            self.matchers[rid] = self.pool.matcher(compiled)
            ready.append(req)
        return ready, failed

    def wait(self, timeout: float) -> None:
        """Block until some compilation finishes (or ``timeout`` seconds), for an idle engine."""
        if self.waiting:
            cf.wait([f for _, f in self.waiting.values()], timeout, return_when=cf.FIRST_COMPLETED)

    def bitmask(self, scheduled: Iterable[str], requests: Mapping[str, Request],
                drafts: Mapping[str, list[int]] | None = None) -> GrammarBitmask | None:
        """Rows for the scheduled requests with a grammar that sample this step (all their
        known tokens computed once the step runs). A request verifying ``k`` drafts gets
        ``k + 1`` rows: the matcher walks the drafts, filling the row for each position, and
        is rolled back after. Past a draft the grammar refuses, rows repeat the last one: that
        draft is rejected for sure (the target may not sample it), so later rows are never used."""
        drafts = drafts or {}
        rids = [rid for rid in scheduled if rid in self.matchers
                and requests[rid].num_computed_tokens >= requests[rid].num_tokens]
        if not rids:
            return None
        owners = [rid for rid in rids for _ in range(len(drafts.get(rid, ())) + 1)]
        mask = xgrammar().allocate_token_bitmask(len(owners), self.vocab_size)
        row = 0
        for rid in rids:
            m, walked = self.matchers[rid], 0
            m.fill_next_token_bitmask(mask, row)
            for j, t in enumerate(drafts.get(rid, ())):
                if walked == j and not m.is_terminated() and m.accept_token(t):
                    walked += 1
                    m.fill_next_token_bitmask(mask, row + j + 1)
                else:
                    mask[row + j + 1] = mask[row + j]
            m.rollback(walked)
            row += len(drafts.get(rid, ())) + 1
        return GrammarBitmask(tuple(owners), mask)

    def accept(self, req_id: str, tokens: list[int]) -> bool:
        """Advance ``req_id``'s matcher; False if the grammar refuses a token (which the
        bitmask should have made impossible: the caller ends the request with an error)."""
        m = self.matchers.get(req_id)
        if m is None:
            return True
        for t in tokens:
            if m.is_terminated():
                return True  # the grammar accepted a stop token: nothing after it matters
            if not m.accept_token(t):
                logger.error("request %s: grammar refused sampled token %d", req_id, t)
                return False
        return True

    def rollback(self, req_id: str, num_tokens: int) -> None:
        if num_tokens and req_id in self.matchers:
            self.matchers[req_id].rollback(num_tokens)

    def remove(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            self.matchers.pop(rid, None)
            self.waiting.pop(rid, None)  # its compilation goes on: the result is cached for others

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.matchers or req_id in self.waiting

    def shutdown(self) -> None:
        self.pool.shutdown()
