"""One simulated replica: the engine's own ``Scheduler`` on simulated time.

A replica does what ``EngineCore.step`` does, with a fake executor: ``schedule()``, then the
step takes ``profile.step_time(shape)`` seconds, then ``update_from_output`` with one token for
every request whose scheduled tokens reach its end (an empty list for a partial prefill
chunk). Requests that arrive while a step runs wait for the next ``schedule()``, as they do in
the engine core's loop, which drains its inputs between steps.

Invariant: ``step_end`` is set iff a step is in flight; a replica with unfinished requests and
no step in flight is started by the caller at once (it never idles with work).
"""

from __future__ import annotations

import inspect

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
        self.scheduler = Scheduler(*profile.engine.configs())
        self.requests: dict[str, Request] = {}
        self.transferred: set[str] = set()  # P/D: prompt K/V arrived, prompt not yet scheduled
        self.step_end: float | None = None
        self.start_pending = False  # an idle replica's step start is queued for this instant
        self._so: SchedulerOutput | None = None
        self._out: ModelRunnerOutput | None = None
        self.busy_s = 0.0
        self.num_steps = 0
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

    def start_step(self, now: float) -> float:
        """Schedule one step at ``now``; returns its duration."""
        so = self.scheduler.schedule()
        if so.total_num_scheduled_tokens == 0:
            raise RuntimeError(f"replica {self.index}: the scheduler holds requests but scheduled "
                               "nothing (no KV room for the head of the queue and nothing running)")
        shape, samples = shape_of(so.num_scheduled_tokens, self.requests, self.transferred)
        ids = list(so.num_scheduled_tokens)
        tok = [SAMPLED_TOKEN]
        self._out = ModelRunnerOutput(ids, [tok if s else [] for s in samples])
        if self.transferred:
            for rid, s in zip(ids, samples):
                if s:
                    self.transferred.discard(rid)
        self._so = so
        dt = self.profile.step_time(shape)
        self.step_end = now + dt
        self.busy_s += dt
        self.num_steps += 1
        return dt

    def finish_step(self):
        """End the step in flight: the scheduler's ``EngineCoreOutput`` list."""
        so, out = self._so, self._out
        self._so = self._out = None
        self.step_end = None
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
