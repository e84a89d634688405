"""The discrete-event fleet simulator: arrivals -> router -> replicas (-> KV transfer -> decode).

Events, in time order: an arrival (routed at once to a replica of the front pool), the end of
a replica's step, a KV transfer landing on a decode replica (P/D), the start of an idle
replica's step, a timeline tick. At equal times arrivals come first, as the engine core drains
all its pending inputs before each step: an idle replica starts a step only after every
arrival of that instant. A busy replica starts its next step the moment the previous one ends.

P/D: a request runs on a prefill replica with ``max_tokens = 1`` (its first token), then its
prompt K/V moves to a decode replica in ``kv_latency_s + prompt_tokens * kv_bytes_per_token /
kv_bandwidth`` seconds and continues there as prompt + first token, whose prompt costs no
compute (see ``step_model.shape_of``; it still passes through the decode scheduler's token
budget, which a KV connector's external prefix hit would skip).
"""

from __future__ import annotations

import gc
import heapq
import time
from dataclasses import dataclass

from fleetlm.request import Request
from fleetlm.sampling_params import SamplingParams
from fleetlm.sim.profile import Profile
from fleetlm.sim.replica import SAMPLED_TOKEN, Replica
from fleetlm.sim.results import Recorder, SimResult, Timeline
from fleetlm.sim.router import Router
from fleetlm.sim.sampling import sub_fleet, thin
from fleetlm.sim.workload import Arrivals, PromptFactory

_STEP, _KV, _TICK, _START = 0, 1, 2, 3


@dataclass(frozen=True)
class FleetConfig:
    replicas: int = 1
    router: str = "round_robin"
    prefill_replicas: int = 0  # > 0: a P/D split (the rest decode)
    sample_replicas: int | None = None  # simulate about this many (None: all)
    kv_bandwidth: float = 50e9  # bytes/s between a prefill and a decode replica
    kv_latency_s: float = 1e-3
    warmup_s: float = 0.0  # requests arriving earlier are simulated, not measured
    measure_end_s: float | None = None  # nor those arriving at or after this (a cool-down keeps the load on)
    timeline_interval_s: float = 1.0
    itl_limit: int = 2_000_000  # ITL gaps kept (from a 1-in-k subset of requests above this)
    overload_load: int | None = None  # stop when a replica holds more unfinished requests
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.kv_bandwidth > 0 or self.kv_latency_s < 0:
            raise ValueError("the KV transfer bandwidth must be > 0 and its latency >= 0")
        if not self.timeline_interval_s > 0 or self.warmup_s < 0:
            raise ValueError("the timeline interval must be > 0 and the warm-up >= 0")


class FleetSim:
    def __init__(self, profile: Profile, cfg: FleetConfig, arrivals: Arrivals) -> None:
        self.profile, self.cfg = profile, cfg
        self.sf = sub_fleet(cfg.replicas, cfg.prefill_replicas, cfg.sample_replicas)
        Router(cfg.router, 1)  # validates the policy name
        self.arr = thin(arrivals, self.sf, cfg.router, cfg.seed)
        pd = self.sf.prefill > 0
        self.front = [Replica(i, profile, "prefill" if pd else "all") for i in range(self.sf.front)]
        self.back = [Replica(i, profile, "decode") for i in range(self.sf.decode)] if pd else []
        self.front_router = Router(cfg.router, len(self.front))
        self.back_router = Router(cfg.router, len(self.back)) if pd else None
        self.prompts = PromptFactory(SAMPLED_TOKEN)
        self._params: dict[int, SamplingParams] = {}
        self._pending_prompts: dict[int, list[int]] = {}
        self.rec = Recorder(self.arr, cfg.warmup_s, profile.frontend_s, cfg.itl_limit, cfg.measure_end_s)
        pools = {"prefill": self.front, "decode": self.back} if pd else {"all": self.front}
        self.timeline = Timeline(pools, cfg.timeline_interval_s, self.sf)
        self._heap: list = []
        self._seq = 0
        self._live = 0  # non-tick events in the heap
        self.overloaded = False

    # -- events --------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))
        if kind != _TICK:
            self._live += 1

    def _params_for(self, max_tokens: int) -> SamplingParams:
        sp = self._params.get(max_tokens)
        if sp is None:
            sp = self._params[max_tokens] = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return sp

    def _key(self, i: int) -> int | None:
        s, g = int(self.arr.session[i]), int(self.arr.group[i])
        return 2 * s + 1 if s >= 0 else (2 * g if g >= 0 else None)

    def _admit(self, replicas: list[Replica], router: Router, req: Request, i: int, t: float,
               transferred: bool = False) -> None:
        loads = [r.load() for r in replicas] if router.policy != "round_robin" else []
        rep = replicas[router.pick(self._key(i), loads)]
        try:
            rep.add(req, transferred)
        except ValueError as e:  # can never run here: the server would answer 400
            self.rec.fail(i, str(e))
            return
        if self.cfg.overload_load is not None and rep.load() > self.cfg.overload_load:
            self.overloaded = True
        if rep.idle and not rep.start_pending:
            rep.start_pending = True
            self._push(t, _START, rep)

    def _start(self, rep: Replica, t: float) -> None:
        for end in rep.fill(t):
            self._push(end, _STEP, rep)

    def _arrive(self, i: int, t: float) -> None:
        a = self.arr
        out = int(a.output_len[i])
        prompt = self.prompts.prompt(i, int(a.input_len[i]), out, int(a.group[i]), int(a.prefix_len[i]),
                                     int(a.session[i]))
        self.rec.prompt_len[i] = len(prompt)
        self.rec.arrived += 1
        pd = bool(self.back)
        if pd and out > 1:
            self._pending_prompts[i] = prompt
        req = Request(str(i), prompt, self._params_for(1 if pd else out), arrival_time=t)
        self._admit(self.front, self.front_router, req, i, t)

    def _step_end(self, rep: Replica, t: float) -> None:
        rec, to_decode = self.rec, rep.pool == "prefill"
        for o in rep.finish_step(t):
            i = int(o.request_id)
            rec.token(i, t)
            if o.finish_reason is not None:
                prompt = self._pending_prompts.pop(i, None) if to_decode else None
                if prompt is None:
                    rec.done(i, t)
                else:
                    dt = self.cfg.kv_latency_s + len(prompt) * self.profile.kv_bytes_per_token / self.cfg.kv_bandwidth
                    self._push(t + dt, _KV, (i, prompt))
        if rep.has_work:
            self._start(rep, t)

    def _kv_arrive(self, i: int, prompt: list[int], t: float) -> None:
        out = int(self.arr.output_len[i])
        req = Request(str(i), prompt + [SAMPLED_TOKEN], self._params_for(out - 1), arrival_time=t)
        assert self.back_router is not None
        self._admit(self.back, self.back_router, req, i, t, transferred=True)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> SimResult:
        """Simulate to the end. Python's cyclic garbage collector is paused meanwhile: the loop
        makes no reference cycles, and with a long queue of live requests its full collections
        cost up to a third of the run."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if enabled:
                gc.enable()

    def _run(self) -> SimResult:
        wall0 = time.perf_counter()
        times = self.arr.t.tolist()
        n, i, heap = len(times), 0, self._heap
        inf = float("inf")
        self._push(times[0] + self.cfg.timeline_interval_s if n else 0.0, _TICK, None)
        while not self.overloaded:
            t_arr = times[i] if i < n else inf
            if heap and heap[0][0] < t_arr:
                t, _, kind, payload = heapq.heappop(heap)
                if kind == _STEP:
                    self._live -= 1
                    self._step_end(payload, t)
                elif kind == _KV:
                    self._live -= 1
                    self._kv_arrive(payload[0], payload[1], t)
                elif kind == _START:
                    self._live -= 1
                    payload.start_pending = False
                    if payload.idle and payload.has_work:
                        self._start(payload, t)
                else:
                    self.timeline.tick(t, self.rec.arrived, self.rec.completed)
                    if i < n or self._live:
                        self._push(t + self.cfg.timeline_interval_s, _TICK, None)
            elif i < n:
                self._arrive(i, t_arr)
                i += 1
            else:
                break
        return SimResult.build(self, time.perf_counter() - wall0)
