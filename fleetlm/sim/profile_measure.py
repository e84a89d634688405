"""``fleetlm profile``: measure this engine's step time against what each step holds.

The engine is driven through its public objects: ``LLM(...)`` builds it, requests go straight
to its ``EngineCore`` (``add_request``) and each ``EngineCore.step()`` is timed. The shape of
every step is read from the ``SchedulerOutput`` it scheduled (the scheduler's ``schedule`` is
wrapped on this one instance; no engine file changes). Batches are controlled:

1. prefill-only steps of one prompt of 16 ... 2048 tokens (and of several prompts at once);
2. prefills that hit a cached prefix of 256 or 1,024 tokens (1 or 4 prompts of 16 or 128 own
   tokens): the path with cached context;
3. decode "ladders": B requests of one context length whose ``max_tokens`` are staggered so
   the batch halves every few steps (B, B/2, ..., 1), at short, medium and long contexts;
   their prefills are multi-prompt (and chunked) prefill samples too;
4. mixed steps: prompts injected while a ladder decodes.

Prompts are random token ids, distinct except for the prefixes of (2). The samples are fitted
by ``profile_fit.fit_table_model``.
"""

from __future__ import annotations

import platform
import time
from datetime import datetime
from typing import Any

import numpy as np

from fleetlm.sim.profile import EngineLimits, Profile
from fleetlm.sim.profile_fit import fit_table_model
from fleetlm.sim.step_model import StepShape, shape_of


class _Runner:
    """Adds requests to an engine core and times its steps, recording each step's shape."""

    def __init__(self, core: Any, eos: tuple[int, ...], seed: int) -> None:
        self.core, self.eos = core, eos
        self.rng = np.random.default_rng(seed)
        self.shapes: list[StepShape] = []
        self.times: list[float] = []
        self._ids = 0
        sched = core.scheduler
        orig = sched.schedule
        self._scheduled: list[StepShape] = []

        def schedule():
            so = orig()
            if so.total_num_scheduled_tokens:
                self._scheduled.append(shape_of(so.num_scheduled_tokens, sched.requests)[0])
            return so

        sched.schedule = schedule  # this instance only

    def tokens(self, n: int) -> list[int]:
        return self.rng.integers(1000, 40000, n).tolist()

    def add(self, prompt_len: int, max_tokens: int, prefix: list[int] | None = None) -> None:
        from fleetlm.request import Request
        from fleetlm.sampling_params import SamplingParams

        self._ids += 1
        prompt = (prefix or []) + self.tokens(prompt_len)
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.core.add_request(Request(f"profile-{self._ids}", prompt, sp, eos_token_ids=self.eos))

    def step(self, record: bool = True) -> None:
        self._scheduled.clear()
        t0 = time.perf_counter()
        self.core.step()
        dt = time.perf_counter() - t0
        if record and len(self._scheduled) == 1:  # one step scheduled and run (not a pipeline fill)
            self.shapes.append(self._scheduled[0])
            self.times.append(dt)

    def drain(self, record: bool = True, inject: tuple[int, int] | None = None) -> None:
        """Step until idle; ``inject=(at_step, prompt_len)`` adds a prompt mid-way (mixed steps)."""
        k = 0
        while self.core.has_unfinished_requests():
            if inject and k == inject[0]:
                self.add(inject[1], 2)
            self.step(record)
            k += 1


def _ladder(r: _Runner, batch: int, ctx: int, steps_per_rung: int, inject: tuple[int, int] | None = None) -> None:
    remaining, rung = batch, 1
    while remaining:
        half = max(1, remaining // 2)
        for _ in range(half):
            r.add(ctx, 1 + steps_per_rung * rung)
        remaining -= half
        rung += 1
    r.drain(inject=inject)


def _prefix_hits(r: _Runner, prefix_len: int, own: int, count: int) -> None:
    """Compute a prefix once (not recorded), then ``count`` prompts that hit it, in one step."""
    prefix = r.tokens(prefix_len)
    r.add(16, 1, prefix)
    r.drain(record=False)
    for _ in range(count):
        r.add(own, 1, prefix)
    r.drain()


def plan_runs(quick: bool, max_tokens: int, max_seqs: int) -> list[tuple[str, tuple]]:
    """The measured batches: ("prefill", (prompt_len, count)), ("prefix", (prefix_len, own,
    count)) or ("ladder", (batch, ctx, inject))."""
    cap = lambda n: min(n, max_tokens)  # noqa: E731
    if quick:
        return [("prefill", (cap(32), 1)), ("prefill", (cap(256), 1)), ("prefill", (cap(1024), 1)),
                ("prefix", (256, 64, 2)), ("ladder", (min(16, max_seqs), 64, None)),
                ("ladder", (min(4, max_seqs), 512, (3, cap(256))))]
    runs: list[tuple[str, tuple]] = []
    for _ in range(2):
        runs += [("prefill", (cap(n), 1)) for n in (16, 64, 128, 256, 512, 1024, 2048)]
    runs += [("prefill", (cap(n), k)) for n, k in ((64, 4), (128, 8), (512, 4))]
    runs += [("prefix", (p, own, k)) for p in (256, 1024) for own in (16, 128) for k in (1, 4)]
    for _ in range(2):  # twice: the fit averages the noise of a shared machine
        runs += [("ladder", (min(128, max_seqs), 64, (6, cap(768)))),
                 ("ladder", (min(32, max_seqs), 512, (5, cap(256)))),
                 ("ladder", (min(8, max_seqs), 1536, None))]
    return runs


def measure_profile(model: str, engine_kwargs: dict[str, Any], quick: bool = False, seed: int = 0,
                    frontend_s: float = 0.0, log=print) -> Profile:
    """Build the engine, run the measured batches, fit, and return the profile."""
    from fleetlm import LLM

    llm = LLM(model, **engine_kwargs)
    core = llm.engine.core
    args = llm.engine.args
    if getattr(args, "pipeline_parallel_size", 1) > 1:
        raise ValueError("fleetlm profile measures pipeline_parallel_size 1; the simulator models PP "
                         "from the roofline (fleetlm sim --hardware ...)")
    sched, cache = core.scheduler.config, core.scheduler.cache_config
    r = _Runner(core, tuple(llm.engine.tokenizer.eos_token_ids), seed)
    r.add(64, 4)
    r.drain(record=False)  # warm-up: compiled ops, allocator
    t0 = time.perf_counter()
    for kind, p in plan_runs(quick, sched.max_num_batched_tokens, sched.max_num_seqs):
        if kind == "prefill":
            for _ in range(p[1]):
                r.add(p[0], 1)
            r.drain()
        elif kind == "prefix":
            _prefix_hits(r, *p)
        else:
            _ladder(r, p[0], p[1], 2 if quick else 4, p[2])
        log(f"fleetlm profile: {kind} {p}: {len(r.times)} steps measured, {time.perf_counter() - t0:.1f} s")
    step, fit = fit_table_model(r.shapes, r.times)
    engine = EngineLimits(cache.block_size, cache.num_blocks, sched.max_num_batched_tokens, sched.max_num_seqs,
                          sched.max_model_len, cache.enable_prefix_caching)
    kv_bytes = core.executor.collective_rpc("kv_bytes_per_token")[0]
    return Profile(
        model, f"cpu: {_cpu_name()}" if args.resolved_device == "cpu" else args.resolved_device, "measured", step,
        engine, tp=getattr(args, "tensor_parallel_size", 1), pp=1, dtype=str(llm.engine.dtype).removeprefix("torch."),
        kv_bytes_per_token=int(kv_bytes), frontend_s=frontend_s,
        assumptions=("step time = EngineCore.step() wall time, measured on this machine",
                     "steps hold random prompts, distinct except for the measured prefix hits",
                     "a step's time = base(tokens) + per sampled row + per decode KV token + per prefill pair "
                     "(+ per (query, key) and per K/V token read back for chunks with cached context)"),
        fit=fit, samples=tuple((*s, t) for s, t in zip(r.shapes, r.times)),
        machine=f"{_cpu_name()}, {platform.system()} {platform.machine()}, {_threads()} threads",
        created=datetime.now().isoformat(timespec="seconds"))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _threads() -> int:
    import torch

    return torch.get_num_threads()
