"""One worker per tensor/pipeline-parallel rank.

Rank 0's worker lives in this (the engine core's) process; ranks 1.. run
``python -m fleetlm.executor.worker_proc``, started here, or by ``torchrun`` on any number of
nodes (then this process is the torchrun rank 0). Every rank joins ``torch.distributed`` (gloo
on CPU, NCCL on CUDA) for the model's collectives, and loads its own shard from the model path.

Control plane: ZMQ. The driver sends each call (pickled: method name and arguments, e.g. a
``SchedulerOutput``) on one PUSH socket per worker, then runs it on its own worker, and reads
``(call id, rank, ok, payload)`` replies on one PULL socket; the endpoints reach the workers
through a gloo broadcast. Replies of a step come back in step order, so up to
``pipeline_parallel_size`` steps can be in flight: rank 0 computes stage 0 of step k+1 while
later stages still work on step k.

Failure rules, by the phase the runner was in (``ModelRunner.phase``): an error in ``prepare`` on
every rank (no collective yet), or in ``sample`` on the output rank only (after the last one), is
a ``StepError``; an error in ``forward``, one on some ranks only, a worker that exits, a
collective that fails, or ranks that do not answer within ``FAILED_STEP_PATIENCE_S`` of rank 0's
own failure is ``EngineDeadError``: every worker is killed and the process group destroyed.
Under torchrun the control plane binds to the interface the other nodes reach, not to all.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from fleetlm.config import EngineArgs
from fleetlm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from fleetlm.distributed.parallel_state import (
    ParallelConfig,
    RankInfo,
    env_rank,
    get_cpu_group,
    init_distributed,
    reachable_address,
)
from fleetlm.executor.base import EngineDeadError, Executor, StepError, StepHandle
from fleetlm.models.loader import LoadedModel
from fleetlm.worker.worker import Worker

logger = logging.getLogger("fleetlm")

POLL_MS = 100
FAILED_STEP_PATIENCE_S = 10.0  # after rank 0's step failed, how long the others may take to answer


@dataclass(frozen=True)
class StepFailure:
    phase: str  # prepare | forward | sample (see ModelRunner.phase)
    message: str


Reply = tuple[bool, Any]  # (ok, result or StepFailure)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "MASTER_ADDR" in os.environ)


class MultiprocExecutor(Executor):
    def __init__(self, args: EngineArgs, files: LoadedModel, dtype: torch.dtype, max_model_len: int) -> None:
        import zmq

        self.args = args
        self.ctx = None
        self.pcfg = ParallelConfig(args.tensor_parallel_size, args.pipeline_parallel_size)
        self.world = self.pcfg.world_size
        self.max_concurrent_batches = self.pcfg.pipeline_parallel_size
        self.procs: list[subprocess.Popen] = []
        self.senders: list = []
        self.dead: str | None = None
        self.closed = False
        self.reply_addr = ""
        self.external = launched_by_torchrun()
        if self.external and env_rank() != 0:
            raise ValueError(f"under torchrun only rank 0 builds the engine (this is rank {env_rank()}); "
                             "run `fleetlm generate` or `fleetlm serve`, whose other ranks become its workers")
        init_method = None if self.external else f"tcp://127.0.0.1:{free_port()}"
        if not self.external:
            self.procs = [self._spawn_worker(r, init_method) for r in range(1, self.world)]
        self._ids = itertools.count()
        self._pending: dict[int, dict[int, Reply]] = {}  # call id -> remote rank -> reply
        self._mine: dict[int, Reply] = {}  # call id -> rank 0's own result of a step
        self._inflight: deque[int] = deque()
        try:
            self.rank = init_distributed(self.pcfg, 0, torch.device(args.resolved_device), init_method=init_method)
            self.ctx = zmq.Context()
            self.replies = self.ctx.socket(zmq.PULL)
            self._bind_and_announce(zmq)
            self.worker = Worker(args, dtype, max_model_len, local_ranks=self._local_ranks())
            self.worker.load_model(files)
            self.collective_rpc("ready")
        except BaseException:  # no worker, socket or process group outlives a failed start
            self.dead = self.dead or "start-up failed"
            self.shutdown()
            raise
        atexit.register(self.shutdown)  # workers and sockets never outlive the driver

    def _spawn_worker(self, rank: int, init_method: str):
        """Start worker ``rank``; returns a ``Popen``-like handle (``poll``/``wait``/``kill``/
        ``returncode``). Subclasses place workers elsewhere (``ray_executor.py``)."""
        return spawn_worker(self.args, rank, init_method, self.world)

    def _local_ranks(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world)) if self.external else self.world

    def _bind_and_announce(self, zmq) -> None:
        """Bind the reply socket, connect one sender per worker after they bind theirs."""
        if self.external:  # bound to the interface the other nodes reach, never to all of them
            host = reachable_address()
            port = self.replies.bind_to_random_port(f"tcp://{host}")
            addr = f"tcp://{host}:{port}"
        else:
            addr = f"ipc://{tempfile.gettempdir()}/fleetlm-{os.getpid()}-{uuid.uuid4().hex[:8]}-replies"
            self.replies.bind(addr)
        self.reply_addr = addr
        box = [addr]
        dist.broadcast_object_list(box, src=0, group=get_cpu_group())
        worker_addrs = [None] * self.world
        dist.all_gather_object(worker_addrs, None, group=get_cpu_group())
        for r in range(1, self.world):
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, 0)
            s.connect(worker_addrs[r])
            self.senders.append(s)

    # -- calls ----------------------------------------------------------------------------------
    def _call_remote(self, method: str, *args: Any) -> int:
        """Send a call to every remote rank; their replies collect under the returned id."""
        self.check_health()
        cid = next(self._ids)
        self._pending[cid] = {}
        msg = pickle.dumps((cid, method, args), protocol=pickle.HIGHEST_PROTOCOL)
        for s in self.senders:
            s.send(msg)
        return cid

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        cid = self._call_remote(method, *args)
        try:
            mine = getattr(self.worker, method)(*args)
        except ValueError:  # bad input (e.g. a KV budget too small): every rank sees the same
            self.dead = f"{method} was refused"
            self.shutdown()
            raise
        except Exception as e:
            self._fail(f"rank 0 raised in {method}: {type(e).__name__}: {e}")
        replies = self._wait_remote(cid)
        bad = {r: p for r, (ok, p) in replies.items() if not ok}
        if bad:
            self._fail(f"rank {min(bad)} raised in {method}: {bad[min(bad)]}")
        return [mine] + [replies[r][1] for r in range(1, self.world)]

    def execute_model_async(self, so: SchedulerOutput) -> StepHandle:
        cid = self._call_remote("execute_model", so)
        self._inflight.append(cid)
        try:
            mine: Reply = (True, self.worker.execute_model(so))
        except Exception as e:
            mine = (False, StepFailure(self.worker.runner.phase, f"{type(e).__name__}: {e}"))
            if self.worker.runner.phase == "forward":
                self._fail(f"rank 0 failed inside the forward pass: {mine[1].message}")
        self._mine[cid] = mine
        return _MultiprocStep(self, cid)

    def _step_result(self, cid: int) -> ModelRunnerOutput:
        if self._inflight[0] != cid:
            raise RuntimeError("step results must be collected in the order the steps were started")
        replies = self._wait_remote(cid, patience_s=FAILED_STEP_PATIENCE_S if not self._mine[cid][0] else None)
        replies[0] = self._mine.pop(cid)
        self._inflight.popleft()
        failed = {r: p for r, (ok, p) in replies.items() if not ok}
        if not failed:
            return replies[RankInfo.output_rank(self.pcfg)][1]
        first = failed[min(failed)]
        if any(f.phase == "forward" for f in failed.values()):
            self._fail(f"rank {min(failed)} failed inside the forward pass: {first.message}")
        if len(failed) == self.world and all(f.phase == "prepare" for f in failed.values()):
            raise StepError(first.message)
        if set(failed) == {RankInfo.output_rank(self.pcfg)} and first.phase == "sample":
            raise StepError(first.message)
        self._fail(f"a step failed on ranks {sorted(failed)} only: {first.message}")

    def _wait_remote(self, cid: int, patience_s: float | None = None) -> dict[int, Reply]:
        """Every remote rank's reply to call ``cid``. With ``patience_s``, ranks that do not
        answer in time are taken as hung (``EngineDeadError``)."""
        got = self._pending[cid]
        deadline = None if patience_s is None else time.monotonic() + patience_s
        while len(got) < self.world - 1:
            if not self._recv_one(deadline):
                self._fail(f"ranks {sorted(set(range(1, self.world)) - set(got))} did not finish a failed step")
        return self._pending.pop(cid)

    def _recv_one(self, deadline: float | None = None) -> bool:
        """Take one reply; False if ``deadline`` passed first."""
        while not self.replies.poll(POLL_MS):
            self.check_health()
            if deadline is not None and time.monotonic() > deadline:
                return False
        cid, rank, ok, payload = pickle.loads(self.replies.recv())
        if cid in self._pending:
            self._pending[cid][rank] = (ok, payload)
        return True

    # -- health -----------------------------------------------------------------------------------
    def check_health(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        for r, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                self._fail(f"worker rank {r} exited with code {p.returncode}")

    def _fail(self, why: str) -> None:
        self.dead = why
        logger.error("engine dead: %s", why)
        self.shutdown()  # workers killed, group destroyed: a later engine here starts clean
        raise EngineDeadError(why)

    def _kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def shutdown(self) -> None:
        """Stop every worker (asked, then killed), close the sockets, leave the process group.
        Idempotent; safe on a half-started or dead executor."""
        if self.closed:
            return
        self.closed = True
        if self.dead is None and self.senders:
            try:
                self._call_remote("shutdown")
                deadline = time.monotonic() + 5
                for p in self.procs:
                    p.wait(max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - shutting down: kill what is left
                pass
        self._kill()
        if self.ctx is not None:
            for s in self.senders:  # linger: a worker started elsewhere (torchrun) must get "shutdown"
                s.close(linger=0 if self.dead else 2000)
            self.replies.close(linger=0)
            self.ctx.term()
            self.ctx = None
        if self.reply_addr.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self.reply_addr.removeprefix("ipc://"))
        from fleetlm.distributed.parallel_state import destroy_distributed

        try:
            destroy_distributed()
        except Exception as e:  # noqa: BLE001 - a dead peer may make teardown fail
            logger.warning("process group teardown: %s", e)


class _MultiprocStep(StepHandle):
    def __init__(self, ex: MultiprocExecutor, cid: int) -> None:
        self.ex, self.cid, self.done, self.value = ex, cid, False, None

    def result(self) -> ModelRunnerOutput:
        if not self.done:
            self.value, self.done = self.ex._step_result(self.cid), True
        return self.value


def spawn_worker(args: EngineArgs, rank: int, init_method: str, local_ranks: int) -> subprocess.Popen:
    """A fresh interpreter (no fork of a loaded parent) running one worker rank."""
    argv = [sys.executable, "-m", "fleetlm.executor.worker_proc", msgspec.json.encode(args).decode(),
            str(rank), init_method, str(local_ranks)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)
