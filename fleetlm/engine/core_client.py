"""How a front end talks to an engine core: one interface, two implementations.

- ``InprocClient`` (offline ``LLM``): the ``EngineCore`` in this process; ``step()`` runs one
  engine step and returns its outputs.
- ``AsyncMPClient`` (the server's ``AsyncLLM``): the core in its own process
  (``python -m fleetlm.engine.core_proc``), driven over ZMQ with msgpack; ``get_output()``
  awaits the core's next message.

Both expose the same calls (``add_requests``, ``abort_requests``, ``shutdown``) and the same
facts once started (``max_model_len``, ``cache_config``), so the doors above them validate and
account for requests the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import uuid
from abc import ABC, abstractmethod

import msgspec

from fleetlm.config import CacheConfig, EngineArgs
from fleetlm.core.sched_output import EngineCoreOutput
from fleetlm.engine.core_proc import (
    AbortRequests,
    AddLoRA,
    AddRequests,
    CoreOutputs,
    Failed,
    NewRequest,
    OutputMessage,
    Ready,
    RemoveLoRA,
    Shutdown,
    spawn_engine_core,
)
from fleetlm.metrics.stats import SchedulerStats
from fleetlm.models.loader import LoadedModel
from fleetlm.request import Request


class EngineCoreClient(ABC):
    max_model_len: int
    cache_config: CacheConfig

    @abstractmethod
    def add_requests(self, reqs: list[Request]) -> None: ...

    @abstractmethod
    def abort_requests(self, request_ids: list[str]) -> None: ...

    @abstractmethod
    def add_lora(self, name: str, path: str) -> None:
        """Load a LoRA adapter (checked by the caller) on every core and rank."""

    @abstractmethod
    def remove_lora(self, name: str) -> None:
        """Unload it once the requests using it have finished."""


class InprocClient(EngineCoreClient):
    def __init__(self, args: EngineArgs, files: LoadedModel, dtype, max_model_len: int) -> None:
        from fleetlm.core.kv_events import attach_publisher
        from fleetlm.engine.engine_core import EngineCore

        self.core = EngineCore(args, files, dtype, max_model_len)
        self.max_model_len = max_model_len
        self.cache_config = self.core.cache_config
        self.kv_events = attach_publisher(self.core, args.kv_events_endpoint)  # None unless asked for

    def add_requests(self, reqs: list[Request]) -> None:
        for r in reqs:
            self.core.add_request(r)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)

    def add_lora(self, name: str, path: str) -> None:
        self.core.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.core.remove_lora(name)

    def step(self) -> list[EngineCoreOutput]:
        outputs = self.core.step()
        if self.kv_events is not None:
            self.kv_events.flush()
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        return self.core.stats()

    def shutdown(self) -> None:
        self.core.shutdown()
        if self.kv_events is not None:
            self.kv_events.close()
            self.kv_events = None


class AsyncMPClient(EngineCoreClient):
    """Owns the core process and its two IPC sockets (paths carry our PID and a random suffix)."""

    def __init__(self, args: EngineArgs, log_level: int) -> None:
        self.args = args
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(OutputMessage)

    async def start(self) -> None:
        """Spawn the engine core and wait until it has loaded the model (``RuntimeError`` if it
        failed to)."""
        import zmq
        import zmq.asyncio

        base = os.path.join(tempfile.gettempdir(), f"fleetlm-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._in_addr, self._out_addr = f"ipc://{base}-in", f"ipc://{base}-out"
        self._zctx = zmq.asyncio.Context()
        self._sync_ctx = zmq.Context()
        self._in = self._sync_ctx.socket(zmq.PUSH)  # plain socket: a send never needs awaiting
        self._in.setsockopt(zmq.SNDHWM, 0)  # never drop: queue bounds live in the front end
        self._in.bind(self._in_addr)
        self._out = self._zctx.socket(zmq.PULL)
        self._out.bind(self._out_addr)
        self.proc = spawn_engine_core(self.args, self._in_addr, self._out_addr, self.log_level)
        msg = await self._recv_ready()
        self.max_model_len = msg.max_model_len
        self.cache_config = CacheConfig(msg.block_size, msg.num_blocks, self.args.enable_prefix_caching)

    async def _recv_ready(self) -> Ready:
        while True:
            if await self._out.poll(200):
                msg = self._dec.decode(await self._out.recv())
                if isinstance(msg, Failed):
                    raise RuntimeError(f"engine core failed to start: {msg.error}")
                assert isinstance(msg, Ready), msg
                return msg
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine core exited during start-up (exit code {self.proc.returncode})")

    @staticmethod
    def encode_add(reqs: list[Request], arrival: float) -> AddRequests:
        return AddRequests([NewRequest(r.request_id, r.prompt_token_ids, r.sampling_params, r.eos_token_ids,
                                       arrival, r.tenancy, r.lora_name, kv_transfer_params=r.kv_transfer_params) for r in reqs])

    def encode(self, msg) -> bytes:
        return self._enc.encode(msg)

    def send_encoded(self, data: bytes) -> None:
        self._in.send(data)

    def add_requests(self, reqs: list[Request], arrival: float = 0.0) -> None:
        self.send_encoded(self.encode(self.encode_add(reqs, arrival)))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.send_encoded(self.encode(AbortRequests(request_ids)))

    def add_lora(self, name: str, path: str) -> None:
        self.send_encoded(self.encode(AddLoRA(name, path)))

    def remove_lora(self, name: str) -> None:
        self.send_encoded(self.encode(RemoveLoRA(name)))

    async def get_output(self, poll_ms: int = 250) -> CoreOutputs | Failed | None:
        """The core's next message; None if nothing came within ``poll_ms``."""
        if not await self._out.poll(poll_ms):
            return None
        msg = self._dec.decode(await self._out.recv())
        return msg if isinstance(msg, CoreOutputs | Failed) else None

    def exit_code(self) -> int | None:
        """The core process's exit code, or None while it runs."""
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def shutdown(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            import zmq

            with contextlib.suppress(Exception):  # never block: the core may be exiting right now
                self._in.send(self._enc.encode(Shutdown()), flags=zmq.NOBLOCK)
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._in.close(linger=0)
        self._out.close(linger=0)
        self._zctx.term()
        self._sync_ctx.term()
        for addr in (self._in_addr, self._out_addr):
            with contextlib.suppress(OSError):
                os.unlink(addr.removeprefix("ipc://"))
        self.proc = None
