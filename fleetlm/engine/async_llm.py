"""``AsyncLLM``: the asyncio front end of an engine core running in its own process.

It tokenizes nothing itself (the server does) but owns everything else between the HTTP layer
and the core: admission (queue bounds), fan-out of ``n`` samples, detokenization and stop strings
(``OutputProcessor``), one output queue per request, aborts, timeouts, and the health of the core.

Locking rule: all state is touched only from the event loop thread; the output loop is one task.
Invariant: every request handed to ``generate`` ends with a finished output or an exception, and
on any exit (done, error, timeout, cancellation when a client disconnects) it is gone from the
core, so its KV blocks are back in the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator

import msgspec

from fleetlm.config import CacheConfig, EngineArgs
from fleetlm.core.scheduler import check_request_fits
from fleetlm.engine.core_proc import (
    AbortRequests,
    AddRequests,
    CoreOutputs,
    Failed,
    NewRequest,
    OutputMessage,
    Ready,
    Shutdown,
    spawn_engine_core,
)
from fleetlm.engine.llm_engine import fan_out, load_engine_parts
from fleetlm.engine.output_processor import OutputProcessor, StatsSink
from fleetlm.metrics.stats import SchedulerStats
from fleetlm.outputs import RequestOutput
from fleetlm.sampling_params import SamplingParams

logger = logging.getLogger("fleetlm")


class EngineDeadError(RuntimeError):
    """The engine-core process is gone; nothing can be served."""


class QueueFullError(RuntimeError):
    """Admission refused: the waiting queue is at its bound (HTTP 429)."""


class RequestTimeoutError(RuntimeError):
    """The request ran past the per-request timeout and was aborted."""


class AsyncLLM:
    def __init__(self, args: EngineArgs, *, max_queued_requests: int | None = None,
                 max_queued_tokens: int | None = None, request_timeout: float | None = None,
                 stats_sink: StatsSink | None = None) -> None:
        files, _, self.max_model_len = load_engine_parts(args)  # tokenizer and config; weights stay unread
        self.args = args
        self.model_config = files.config
        self.tokenizer = files.tokenizer
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.request_timeout = request_timeout
        self.stats_sink = stats_sink
        self.output_processor = OutputProcessor(self.tokenizer, stats_sink)
        self.stats = SchedulerStats()
        self.cache_config: CacheConfig | None = None
        self.dead_reason: str | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._sent_seqs = 0  # sequences / prompt tokens sent to the core, for queue accounting
        self._sent_tokens = 0
        self._proc = None
        self._loop_task: asyncio.Task | None = None

    # -- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the engine core and wait until it has loaded the model (or failed to)."""
        import zmq
        import zmq.asyncio

        base = os.path.join(tempfile.gettempdir(), f"fleetlm-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._in_addr, self._out_addr = f"ipc://{base}-in", f"ipc://{base}-out"
        self._zctx = zmq.asyncio.Context()
        self._sync_ctx = zmq.Context()
        self._in = self._sync_ctx.socket(zmq.PUSH)  # plain socket: a send never needs awaiting
        self._in.setsockopt(zmq.SNDHWM, 0)  # never drop: the queue bound lives in _admit
        self._in.bind(self._in_addr)
        self._out = self._zctx.socket(zmq.PULL)
        self._out.bind(self._out_addr)
        self._dec = msgspec.msgpack.Decoder(OutputMessage)
        self._enc = msgspec.msgpack.Encoder()
        self._proc = spawn_engine_core(self.args, self._in_addr, self._out_addr, logger.getEffectiveLevel())
        msg = await self._recv_ready()
        self.max_model_len = msg.max_model_len
        self.cache_config = CacheConfig(msg.block_size, msg.num_blocks, self.args.enable_prefix_caching)
        self._loop_task = asyncio.create_task(self._output_loop(), name="fleetlm-output-loop")

    async def _recv_ready(self) -> Ready:
        while True:
            if await self._out.poll(200):
                msg = self._dec.decode(await self._out.recv())
                if isinstance(msg, Failed):
                    raise RuntimeError(f"engine core failed to start: {msg.error}")
                assert isinstance(msg, Ready), msg
                return msg
            if self._proc.poll() is not None:
                raise RuntimeError(f"engine core exited during start-up (exit code {self._proc.returncode})")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._proc is not None and self._proc.poll() is None:
            import zmq

            with contextlib.suppress(Exception):  # never block: the core may be exiting right now
                self._in.send(self._enc.encode(Shutdown()), flags=zmq.NOBLOCK)
            try:
                await asyncio.to_thread(self._proc.wait, 10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._proc is not None:
            self._in.close(linger=0)
            self._out.close(linger=0)
            self._zctx.term()
            self._sync_ctx.term()
            for addr in (self._in_addr, self._out_addr):
                with contextlib.suppress(OSError):
                    os.unlink(addr.removeprefix("ipc://"))
            self._proc = None

    @property
    def num_inflight(self) -> int:
        return len(self._queues)

    @property
    def engine_pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # -- requests -----------------------------------------------------------------------------
    def queued(self) -> tuple[int, int]:
        """(sequences, prompt tokens) waiting for a start: the core's last report plus what was
        sent after it."""
        s = self.stats
        return (s.num_waiting + self._sent_seqs - s.num_adds_seen,
                s.num_waiting_tokens + self._sent_tokens - s.num_tokens_seen)

    def check_queue_bounds(self, num_seqs: int, num_tokens: int) -> None:
        """``ValueError`` (400) if a request this size is over a queue bound even with an empty
        queue: retrying could never help, so it is not a 429."""
        for n, bound, what in ((num_seqs, self.max_queued_requests, "sequences (n x prompts)"),
                               (num_tokens, self.max_queued_tokens, "prompt tokens (x n)")):
            if bound is not None and n > bound:
                raise ValueError(f"this request alone has {n} {what}, more than the waiting queue holds ({bound})")

    def _admit(self, num_seqs: int, num_tokens: int) -> None:
        """``QueueFullError`` (429) if the queue has no room for this request now."""
        seqs, tokens = self.queued()
        if self.max_queued_requests is not None and seqs + num_seqs > self.max_queued_requests:
            raise QueueFullError(f"the waiting queue is full ({seqs} of --max-queued-requests "
                                 f"{self.max_queued_requests} sequences); retry later")
        if self.max_queued_tokens is not None and tokens + num_tokens > self.max_queued_tokens:
            raise QueueFullError(f"the waiting queue is full ({tokens} of --max-queued-tokens "
                                 f"{self.max_queued_tokens} prompt tokens); retry later")

    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                    *, stream: bool = False, arrival_time: float | None = None, record: bool = True,
                    admit: bool = True, timeout: float | None = None) -> RequestStream:
        """Validate, admit and send one request; its outputs come from the returned stream.

        Raises ``ValueError`` (bad request), ``QueueFullError`` or ``EngineDeadError``, having
        sent nothing. The caller must ``close()`` the stream if it stops reading early.
        """
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        if admit:
            self.check_queue_bounds(params.n, len(prompt_ids) * params.n)  # before fanning out n
        reqs = fan_out(request_id, prompt_ids, params, self.tokenizer.eos_token_ids, self.max_model_len)
        check_request_fits(len(prompt_ids), reqs[0].max_tokens, self.max_model_len, self.cache_config)
        if admit:
            self._admit(len(reqs), len(prompt_ids) * len(reqs))
        arrival = arrival_time or time.monotonic()
        try:  # encode before registering anything: a value msgpack cannot carry is a bad request
            msg = self._enc.encode(AddRequests([NewRequest(r.request_id, r.prompt_token_ids, r.sampling_params,
                                                           r.eos_token_ids, arrival) for r in reqs]))
        except (OverflowError, UnicodeError, TypeError) as e:
            raise ValueError(f"the request holds a value that cannot be sent to the engine: {e}") from None
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self.output_processor.add(request_id, prompt, prompt_ids, params, [r.request_id for r in reqs], arrival,
                                  stream=stream, record=record)
        self._in.send(msg)
        self._sent_seqs += len(reqs)
        self._sent_tokens += len(prompt_ids) * len(reqs)
        if record and self.stats_sink is not None:
            self.stats_sink.on_request_added(len(prompt_ids) * len(reqs))
        timeout = self.request_timeout if timeout is None else timeout
        return RequestStream(self, request_id, queue, None if timeout is None else arrival + timeout, timeout)

    async def generate(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                       **kwargs) -> AsyncIterator[RequestOutput]:
        """``add_request`` then yield its outputs (deltas when ``stream=True``)."""
        rs = self.add_request(request_id, prompt, prompt_ids, params, **kwargs)
        try:
            async for out in rs:
                yield out
        finally:
            rs.close()

    def abort(self, request_id: str) -> None:
        """Drop a request everywhere (safe to call twice, and from a ``finally`` block)."""
        child_ids = self.output_processor.abort(request_id)
        if child_ids and self.dead_reason is None:
            self._send(AbortRequests(child_ids))

    def _send(self, msg) -> None:
        self._in.send(self._enc.encode(msg))

    # -- the output loop --------------------------------------------------------------------------
    async def _output_loop(self) -> None:
        try:
            while True:
                if not await self._out.poll(250):
                    if self._proc.poll() is not None:
                        self._mark_dead(f"the engine core process exited (code {self._proc.returncode})")
                        return
                    continue
                msg = self._dec.decode(await self._out.recv())
                if isinstance(msg, CoreOutputs):
                    self._handle(msg)
                elif isinstance(msg, Failed):  # the core is going down (e.g. a worker rank died)
                    self._mark_dead(f"the engine core failed: {msg.error}")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not leave clients hanging
            logger.exception("output loop failed")
            self._mark_dead(f"the output loop failed: {type(e).__name__}: {e}")

    def _handle(self, msg: CoreOutputs) -> None:
        self.stats = msg.stats
        if self.stats_sink is not None:
            self.stats_sink.on_scheduler_stats(msg.stats)
        ready, to_abort = self.output_processor.process(msg.outputs)
        if to_abort:
            self._send(AbortRequests(to_abort))
        for out in ready:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _forget(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def _mark_dead(self, reason: str) -> None:
        logger.error("engine dead: %s", reason)
        self.dead_reason = reason
        self.fail_all(reason)

    def fail_all(self, reason: str) -> None:
        """End every in-flight request with ``EngineDeadError(reason)`` and abort it in the core."""
        for rid, q in list(self._queues.items()):
            self.abort(rid)
            q.put_nowait(EngineDeadError(reason))


class RequestStream:
    """Async iterator over one request's outputs. ``close()`` (idempotent) aborts it in the
    engine unless it already finished; it runs on every early exit of ``__anext__``."""

    def __init__(self, engine: AsyncLLM, request_id: str, queue: asyncio.Queue, deadline: float | None,
                 timeout: float | None) -> None:
        self.engine = engine
        self.request_id = request_id
        self.queue = queue
        self.deadline = deadline
        self.timeout = timeout
        self.finished = False
        self.closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self.closed:
            raise StopAsyncIteration
        try:
            item = await self._get()
        except BaseException:  # timeout, or cancelled because the client went away
            self.close()
            raise
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self.finished = True
            self.close()
        return item

    async def _get(self):
        if self.deadline is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            raise RequestTimeoutError(f"request {self.request_id} exceeded the {self.timeout:g} s request "
                                      "timeout and was aborted") from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.engine._forget(self.request_id)
        if not self.finished:
            self.engine.abort(self.request_id)
