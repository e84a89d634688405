"""``DPSyncClient``: offline ``LLM(data_parallel_size=N)`` drives N engine-core processes.

The same calls as ``InprocClient`` (``add_requests``, ``abort_requests``, ``step``,
``has_unfinished_requests``, ``stats``, ``shutdown``); requests are balanced by
``dp_client.DPBalancer``. ``step()`` waits until some core has news (checking that every core
process is alive) and returns all the outputs that arrived.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import time
import uuid

import msgspec

from fleetlm.config import CacheConfig, EngineArgs
from fleetlm.core.sched_output import EngineCoreOutput
from fleetlm.engine.core_proc import (
    AbortRequests,
    CoreOutputs,
    Failed,
    OutputMessage,
    Ready,
    Shutdown,
    spawn_engine_core,
)
from fleetlm.engine.dp_client import DPBalancer, core_args, merge_stats
from fleetlm.executor.base import EngineDeadError
from fleetlm.metrics.stats import SchedulerStats
from fleetlm.request import Request

START_TIMEOUT_S = 600.0


class _Core:
    def __init__(self, ctx, args: EngineArgs, i: int) -> None:
        import zmq

        base = os.path.join(tempfile.gettempdir(), f"fleetlm-{os.getpid()}-dp{i}-{uuid.uuid4().hex[:8]}")
        self.in_addr, self.out_addr = f"ipc://{base}-in", f"ipc://{base}-out"
        self.inp = ctx.socket(zmq.PUSH)
        self.inp.setsockopt(zmq.SNDHWM, 0)
        self.inp.bind(self.in_addr)
        self.out = ctx.socket(zmq.PULL)
        self.out.bind(self.out_addr)
        self.proc: subprocess.Popen = spawn_engine_core(args, self.in_addr, self.out_addr,
                                                        logging.getLogger("fleetlm").getEffectiveLevel())


class DPSyncClient:
    def __init__(self, args: EngineArgs) -> None:
        import zmq

        self._ctx = zmq.Context()
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(OutputMessage)
        n = args.data_parallel_size
        self.cores = [_Core(self._ctx, core_args(args, i), i) for i in range(n)]
        self.balancer = DPBalancer(n, args.data_parallel_policy, args.seed)
        try:
            readies = [self._wait_ready(c, i) for i, c in enumerate(self.cores)]
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = min(r.max_model_len for r in readies)
        small = min(readies, key=lambda r: r.num_blocks)
        self.cache_config = CacheConfig(small.block_size, small.num_blocks, args.enable_prefix_caching)

    def _wait_ready(self, core: _Core, i: int) -> Ready:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if core.out.poll(200):
                msg = self._dec.decode(core.out.recv())
                if isinstance(msg, Failed):
                    raise RuntimeError(f"data-parallel core {i} failed to start: {msg.error}")
                if isinstance(msg, Ready):
                    return msg
            elif core.proc.poll() is not None:
                raise RuntimeError(f"data-parallel core {i} exited during start-up (code {core.proc.returncode})")
        raise RuntimeError(f"data-parallel core {i} did not start within {START_TIMEOUT_S:g} s")

    def add_requests(self, reqs: list[Request]) -> None:
        from fleetlm.engine.core_client import AsyncMPClient

        msg = AsyncMPClient.encode_add(reqs, time.monotonic())
        self.cores[self.balancer.route_add(msg)].inp.send(self._enc.encode(msg))

    def abort_requests(self, request_ids: list[str]) -> None:
        for i, ids in self.balancer.route_abort(request_ids).items():
            self.cores[i].inp.send(self._enc.encode(AbortRequests(ids)))

    def add_lora(self, name: str, path: str) -> None:
        from fleetlm.engine.core_proc import AddLoRA

        for c in self.cores:
            c.inp.send(self._enc.encode(AddLoRA(name, path)))

    def remove_lora(self, name: str) -> None:
        from fleetlm.engine.core_proc import RemoveLoRA

        for c in self.cores:
            c.inp.send(self._enc.encode(RemoveLoRA(name)))

    def has_unfinished_requests(self) -> bool:
        return bool(self.balancer.owner)

    def step(self) -> list[EngineCoreOutput]:
        """Outputs of every core that has some; waits (up to a few seconds at a time, checking
        the processes) only while requests are unfinished."""
        import zmq

        if not self.has_unfinished_requests():
            return []
        poller = zmq.Poller()
        for c in self.cores:
            poller.register(c.out, zmq.POLLIN)
        out: list[EngineCoreOutput] = []
        while not out and self.has_unfinished_requests():
            ready = dict(poller.poll(500))
            for i, c in enumerate(self.cores):
                while c.out in ready and c.out.poll(0):
                    msg = self._dec.decode(c.out.recv())
                    if isinstance(msg, Failed):
                        raise EngineDeadError(f"data-parallel core {i}: {msg.error}")
                    if isinstance(msg, CoreOutputs):
                        out.extend(self.balancer.on_outputs(i, msg).outputs)
                if c.proc.poll() is not None:
                    raise EngineDeadError(f"data-parallel core {i} exited (code {c.proc.returncode})")
            if not ready:
                break  # let the caller look around (its loop calls step again)
        return out

    def stats(self) -> SchedulerStats:
        return merge_stats(self.balancer.stats)

    def shutdown(self) -> None:
        for c in getattr(self, "cores", []):
            if c.proc.poll() is None:
                with contextlib.suppress(Exception):
                    c.inp.send(self._enc.encode(Shutdown()))
        for c in getattr(self, "cores", []):
            try:
                c.proc.wait(10)
            except subprocess.TimeoutExpired:
                c.proc.kill()
            c.inp.close(linger=0)
            c.out.close(linger=0)
            for addr in (c.in_addr, c.out_addr):
                with contextlib.suppress(OSError):
                    os.unlink(addr.removeprefix("ipc://"))
        self.cores = []
        self._ctx.term()
