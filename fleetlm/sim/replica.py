"""One simulated replica: the engine's own ``Scheduler`` on simulated time.

A replica does what ``EngineCore.step`` does, with a fake executor: ``schedule()``, then the
step takes ``profile.step_time(shape)`` seconds, then ``kv.commit`` and ``update_from_output``
with one token for every request whose scheduled tokens reach its end (an empty list for a
partial prefill chunk). Requests that arrive while a step runs wait for the next
``schedule()``: the engine core's loop drains its inputs only between steps.

Pipeline parallelism (``profile.pp > 1``), as the engine core runs it: after each finished step
it fills the pipeline with up to ``pp`` steps, each holding only requests not already in flight
(``Scheduler.has_schedulable``; the scheduler, told ``pp``, gives a step a ``1/pp`` share of the
requests so the groups take turns), then waits for the oldest. A step of ``T`` seconds (all stages)
enters stage 0 when that stage is free and leaves it ``T / pp`` later; steps finish in order.

Invariant: ``in_flight`` lists the steps submitted and not finished, oldest first; a replica
with work and nothing in flight is started by the caller at once (it never idles with work).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import deque

from fleetlm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from fleetlm.core.scheduler import Scheduler
from fleetlm.request import Request
from fleetlm.sim.profile import Profile
from fleetlm.sim.step_model import shape_of

SAMPLED_TOKEN = 1  # what the fake executor samples (no EOS: requests run to max_tokens)


class Replica:
    def __init__(self, index: int, profile: Profile, pool: str = "all") -> None:
        self.index = index
        self.pool = pool
        self.profile = profile
        sched_cfg, cache_cfg = profile.engine.configs()  # the engine's step split under pp, too
        self.scheduler = Scheduler(dataclasses.replace(sched_cfg, max_concurrent_batches=max(1, profile.pp)),
                                   cache_cfg)
        self.requests: dict[str, Request] = {}
        self.transferred: set[str] = set()  # P/D: prompt K/V arrived, prompt not yet scheduled
        self.in_flight: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
        self.start_pending = False  # an idle replica's step start is queued for this instant
        self.busy_s = 0.0  # closed busy periods (some step in flight)
        self._busy_since = 0.0
        self._stage_free = 0.0
        self._last_end = 0.0
        self.num_steps = 0
        self.pp = max(1, profile.pp) if hasattr(self.scheduler, "has_schedulable") else 1
        self._commit = getattr(getattr(self.scheduler, "kv", None), "commit", None)
        self._commit_by_step = self._commit is not None and bool(inspect.signature(self._commit).parameters)

    def add(self, req: Request, transferred: bool = False) -> None:
        """Queue ``req`` (``ValueError`` if it can never run here, as in the engine)."""
        self.scheduler.add_request(req)
        self.requests[req.request_id] = req
        if transferred:
            self.transferred.add(req.request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    @property
    def idle(self) -> bool:
        return not self.in_flight

    def busy_time(self, t: float) -> float:
        """Seconds with some step in flight, up to ``t``."""
        return self.busy_s + (t - self._busy_since if self.in_flight else 0.0)

    def fill(self, now: float) -> list[float]:
        """Submit steps at ``now`` until the pipeline is full or nothing more is schedulable;
        returns their end times (increasing)."""
        ends = []
        while len(self.in_flight) < self.pp:
            if self.in_flight and not self.scheduler.has_schedulable():
                break
            so = self.scheduler.schedule()
            if so.total_num_scheduled_tokens == 0:
                if self.in_flight:
                    break
                raise RuntimeError(f"replica {self.index}: the scheduler holds requests but scheduled "
                                   "nothing (no KV room for the head of the queue and nothing running)")
            ends.append(self._submit(so, now))
        return ends

    def _submit(self, so: SchedulerOutput, now: float) -> float:
        shape, samples = shape_of(so.num_scheduled_tokens, self.requests, self.transferred)
        ids = list(so.num_scheduled_tokens)
        tok = [SAMPLED_TOKEN]
        out = ModelRunnerOutput(ids, [tok if s else [] for s in samples])
        if self.transferred:
            for rid, s in zip(ids, samples):
                if s:
                    self.transferred.discard(rid)
        dt = self.profile.step_time(shape)
        start = max(now, self._stage_free)
        self._stage_free = start + dt / self.pp
        end = max(start + dt, self._last_end + dt / self.pp)
        self._last_end = end
        if not self.in_flight:
            self._busy_since = now
        self.in_flight.append((so, out))
        self.num_steps += 1
        return end

    def finish_step(self, t: float):
        """End the oldest step in flight (at ``t``): the scheduler's ``EngineCoreOutput`` list."""
        so, out = self.in_flight.popleft()
        if not self.in_flight:
            self.busy_s += t - self._busy_since
        if self._commit_by_step:  # as EngineCore.step after a successful forward
            self._commit(so.step_id)
        elif self._commit is not None:
            self._commit()
        outputs = self.scheduler.update_from_output(so, out)
        for o in outputs:
            if o.finish_reason is not None:
                self.requests.pop(o.request_id, None)
        return outputs

    def load(self) -> int:
        """Unfinished requests here (what a least-load router balances)."""
        return len(self.requests)
