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
import time
from collections.abc import AsyncIterator

from fleetlm.config import CacheConfig, EngineArgs
from fleetlm.engine.core_client import AsyncMPClient
from fleetlm.engine.core_proc import AbortRequests, AddRequests, CoreOutputs, Failed
from fleetlm.engine.output_processor import OutputProcessor, StatsSink
from fleetlm.engine.processor import InputProcessor, load_engine_parts
from fleetlm.executor.base import EngineDeadError
from fleetlm.lora.registry import LoRARegistry
from fleetlm.metrics.stats import SchedulerStats
from fleetlm.outputs import RequestOutput
from fleetlm.request import Tenancy
from fleetlm.sampling_params import SamplingParams

logger = logging.getLogger("fleetlm")

__all__ = ["AsyncLLM", "EngineDeadError", "QueueFullError", "RequestStream", "RequestTimeoutError"]


class QueueFullError(RuntimeError):
    """Admission refused: the waiting queue is at its bound (HTTP 429)."""


class RequestTimeoutError(RuntimeError):
    """The request ran past the per-request timeout and was aborted."""


class AsyncLLM:
    def __init__(self, args: EngineArgs, *, max_queued_requests: int | None = None,
                 max_queued_tokens: int | None = None, request_timeout: float | None = None,
                 stats_sink: StatsSink | None = None) -> None:
        files, _, max_model_len = load_engine_parts(args)  # tokenizer and config; weights stay unread
        self.args = args
        self.processor = InputProcessor(files.tokenizer, files.config, max_model_len)
        self.model_config = files.config
        self.tokenizer = files.tokenizer
        self.loras = LoRARegistry(args.enable_lora, args.max_loras, files.config, args.lora_modules)
        self._lora_lock = asyncio.Lock()  # one load at a time: the check and the add are one step
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
        if args.data_parallel_size > 1:  # N engine cores behind this front end (engine/dp_client.py)
            from fleetlm.engine.dp_client import DPAsyncMPClient

            self.client = DPAsyncMPClient(args, logger.getEffectiveLevel())
        else:
            self.client = AsyncMPClient(args, logger.getEffectiveLevel())
        self._loop_task: asyncio.Task | None = None
        self.last_output_time: float | None = None  # monotonic time of the core's last output message
        self._pings: list[asyncio.Future] = []  # liveness probes waiting for the core's next message

    # -- life cycle -------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.processor.max_model_len

    async def start(self) -> None:
        """Spawn the engine core and wait until it has loaded the model (or failed to)."""
        await self.client.start()
        self.processor.max_model_len = self.client.max_model_len
        self.cache_config = self.processor.cache_config = self.client.cache_config
        self._loop_task = asyncio.create_task(self._output_loop(), name="fleetlm-output-loop")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await self.client.shutdown()

    @property
    def num_inflight(self) -> int:
        return len(self._queues)

    @property
    def engine_pid(self) -> int | None:
        return self.client.pid

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
                    admit: bool = True, timeout: float | None = None, tenancy: Tenancy | None = None,
                    lora_name: str | None = None, kv_transfer_params: dict | None = None) -> RequestStream:
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
        self.loras.check_request(lora_name)
        reqs = self.processor.make_requests(request_id, prompt_ids, params)
        for r in reqs if kv_transfer_params is not None else ():  # disaggregated prefill/decode
            r.kv_transfer_params = kv_transfer_params
        for r in reqs:
            r.tenancy = tenancy if tenancy is not None else r.tenancy
            r.lora_name = lora_name
        if admit:
            self._admit(len(reqs), len(prompt_ids) * len(reqs))
        arrival = arrival_time or time.monotonic()
        try:  # encode before registering anything: a value msgpack cannot carry is a bad request
            msg = self.client.encode(self.client.encode_add(reqs, arrival))
        except (OverflowError, UnicodeError, TypeError) as e:
            raise ValueError(f"the request holds a value that cannot be sent to the engine: {e}") from None
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self.output_processor.add(request_id, prompt, prompt_ids, params, [r.request_id for r in reqs], arrival,
                                  stream=stream, record=record)
        self.client.send_encoded(msg)
        self._sent_seqs += len(reqs)
        self._sent_tokens += len(prompt_ids) * len(reqs)
        if record and self.stats_sink is not None:
            self.stats_sink.on_request_added(len(prompt_ids) * len(reqs))
        timeout = self.request_timeout if timeout is None else timeout
        return RequestStream(self, request_id, queue, None if timeout is None else arrival + timeout, timeout)

    async def add_lora(self, name: str, path: str) -> None:
        """Load a LoRA adapter on every core; checked here first (``ValueError`` -> 400). Loads
        are serialised, so two requests for one name cannot both pass the check."""
        async with self._lora_lock:
            if await asyncio.to_thread(self.loras.prepare_add, name, path):
                self.client.add_lora(name, path)
                self.loras.added(name, path)

    def remove_lora(self, name: str) -> None:
        """New requests may no longer name it; requests using it finish with it."""
        self.loras.remove(name)
        self.client.remove_lora(name)

    async def generate(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                       **kwargs) -> AsyncIterator[RequestOutput]:
        """``add_request`` then yield its outputs (deltas when ``stream=True``)."""
        rs = self.add_request(request_id, prompt, prompt_ids, params, **kwargs)
        try:
            async for out in rs:
                yield out
        finally:
            rs.close()

    def has_started(self, request_id: str) -> bool:
        """Has the core scheduled ``request_id`` yet (or is it gone)? For per-tenant queue bounds."""
        ps = self.output_processor.parents.get(request_id)
        return ps is None or ps.metrics.first_scheduled_time is not None

    def abort(self, request_id: str) -> None:
        """Drop a request everywhere (safe to call twice, and from a ``finally`` block)."""
        child_ids = self.output_processor.abort(request_id)
        if child_ids and self.dead_reason is None:
            self._send(AbortRequests(child_ids))

    def _send(self, msg) -> None:
        self.client.send_encoded(self.client.encode(msg))

    async def ping(self, timeout: float) -> bool:
        """True if the core's loop answers within ``timeout`` seconds. The ping is an empty input
        batch: the core answers it after its current step, so it never waits behind queued work."""
        if self.dead_reason is not None or self._loop_task is None or self._loop_task.done():
            return False
        fut = asyncio.get_running_loop().create_future()
        self._pings.append(fut)
        self._send(AddRequests([]))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            if fut in self._pings:
                self._pings.remove(fut)

    def _answer_pings(self, alive: bool) -> None:
        pings, self._pings = self._pings, []
        for fut in pings:
            if not fut.done():
                fut.set_result(alive)

    # -- the output loop --------------------------------------------------------------------------
    async def _output_loop(self) -> None:
        try:
            while True:
                msg = await self.client.get_output()
                if msg is None:
                    if (code := self.client.exit_code()) is not None:
                        self._mark_dead(f"the engine core process exited (code {code})")
                        return
                elif isinstance(msg, CoreOutputs):
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
        self.last_output_time = time.monotonic()
        self._answer_pings(True)
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
        self._answer_pings(False)
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
