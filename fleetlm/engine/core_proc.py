"""The engine core in its own process, driven over ZMQ with msgpack messages.

The front end (``AsyncLLM``) binds two IPC sockets whose paths carry its PID and a random
suffix, so any number of servers share a host; this process connects to both:

- input  (front end PUSH -> core PULL): ``AddRequests``, ``AbortRequests``, ``Shutdown``;
- output (core PUSH -> front end PULL): ``Ready`` or ``Failed`` once, then ``CoreOutputs`` after
  every step and after every batch of inputs (so queue accounting stays current when idle).

The busy loop drains all pending inputs, runs one ``EngineCore.step``, and sends what it
produced. It never tokenizes or detokenizes. It exits on ``Shutdown`` or when its parent dies.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import traceback

import msgspec

from fleetlm.config import EngineArgs
from fleetlm.core.sched_output import EngineCoreOutput
from fleetlm.executor.base import EngineDeadError
from fleetlm.metrics.stats import SchedulerStats
from fleetlm.request import NO_TENANCY, Request, Tenancy
from fleetlm.sampling_params import SamplingParams

logger = logging.getLogger("fleetlm")

IDLE_POLL_MS = 500  # how often an idle core checks that its parent is alive
HEALTH_CHECK_S = 0.5  # how often the core checks its worker processes (a busy one also finds out in a step)


class NewRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    arrival_time: float
    tenancy: Tenancy | None = None  # tenant, priority, cache salt (issue 15)
    lora_name: str | None = None  # its LoRA adapter (fleetlm/lora)
    kv_transfer_params: dict | None = None  # disaggregated prefill/decode (fleetlm/disagg)


class AddRequests(msgspec.Struct, tag="add", array_like=True):
    requests: list[NewRequest]


class AbortRequests(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class AddLoRA(msgspec.Struct, tag="add_lora", array_like=True):
    name: str
    path: str  # checked by the front end before it sends this


class RemoveLoRA(msgspec.Struct, tag="remove_lora", array_like=True):
    name: str  # unloaded once no request uses it


class Ready(msgspec.Struct, tag="ready", array_like=True):
    max_model_len: int
    block_size: int
    num_blocks: int
    pid: int


class Failed(msgspec.Struct, tag="failed", array_like=True):
    error: str


class CoreOutputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats


InputMessage = AddRequests | AbortRequests | AddLoRA | RemoveLoRA | Shutdown
OutputMessage = Ready | Failed | CoreOutputs


def spawn_engine_core(args: EngineArgs, input_addr: str, output_addr: str, log_level: int) -> subprocess.Popen:
    """Start ``python -m fleetlm.engine.core_proc`` (a fresh interpreter: no fork of a loaded
    parent, and no re-import of the caller's ``__main__``)."""
    argv = [sys.executable, "-m", "fleetlm.engine.core_proc", msgspec.json.encode(args).decode(),
            input_addr, output_addr, str(log_level)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def run_engine_core(args: EngineArgs, input_addr: str, output_addr: str, parent_pid: int,
                    log_level: int = logging.INFO) -> None:
    """Body of the engine-core process."""
    import zmq

    logging.basicConfig(level=log_level, format="%(levelname)s fleetlm.core: %(message)s")
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.connect(output_addr)
    inp = ctx.socket(zmq.PULL)
    inp.connect(input_addr)
    enc = msgspec.msgpack.Encoder()
    try:
        core = _build_core(args)
    except Exception as e:  # tell the front end why, instead of just vanishing
        logger.error("engine core failed to start:\n%s", traceback.format_exc())
        out.send(enc.encode(Failed(f"{type(e).__name__}: {e}")))
        out.close(linger=2000)
        return
    sc = core.scheduler
    out.send(enc.encode(Ready(sc.config.max_model_len, sc.cache_config.block_size, sc.cache_config.num_blocks,
                              os.getpid())))
    from fleetlm.core.kv_events import attach_publisher

    kv_events = attach_publisher(core, args.kv_events_endpoint)  # None unless asked for
    try:
        EngineCoreLoop(core, inp, out, parent_pid, kv_events).run()
    except EngineDeadError as e:  # a worker rank died: say why, then exit (the front end sees it)
        logger.error("engine core exiting: %s", e)
        out.send(enc.encode(Failed(f"EngineDeadError: {e}")))
        sys.exit(1)
    finally:
        core.shutdown()
        if kv_events is not None:
            kv_events.close()
        out.close(linger=1000)
        inp.close(linger=0)
        ctx.term()


def _build_core(args: EngineArgs):
    from fleetlm.engine.engine_core import EngineCore
    from fleetlm.engine.processor import load_engine_parts

    files, dtype, max_model_len = load_engine_parts(args)
    return EngineCore(args, files, dtype, max_model_len)


class EngineCoreLoop:
    def __init__(self, core, inp, out, parent_pid: int, kv_events=None) -> None:
        self.core = core
        self.kv_events = kv_events  # KVEventPublisher: one batch of block events per step
        self.inp = inp
        self.out = out
        self.parent_pid = parent_pid
        self.enc = msgspec.msgpack.Encoder()
        self.dec = msgspec.msgpack.Decoder(InputMessage)
        self.running = True

    def run(self) -> None:
        last_check = time.monotonic()
        while self.running:
            got_input = self._drain_inputs()
            if not self.running:
                return
            if time.monotonic() - last_check > HEALTH_CHECK_S:  # a dead worker rank is found even when idle
                self.core.executor.check_health()
                last_check = time.monotonic()
            outputs = self.core.step()
            if self.kv_events is not None:
                self.kv_events.flush()
            if outputs or got_input or self.core.has_unfinished_requests():
                self.out.send(self.enc.encode(CoreOutputs(outputs, self.core.stats())))

    def _drain_inputs(self) -> bool:
        """Handle every pending message; block (briefly, to watch the parent) when idle."""
        got = False
        while True:
            timeout = 0 if (got or self.core.has_unfinished_requests()) else IDLE_POLL_MS
            if not self.inp.poll(timeout):
                if os.getppid() != self.parent_pid:  # re-parented: the front end died
                    logger.warning("front end gone; engine core exiting")
                    self.running = False
                    return got
                if timeout == 0:
                    return got
                continue
            self._handle(self.dec.decode(self.inp.recv()))
            got = True
            if not self.running:
                return got

    def _handle(self, msg: InputMessage) -> None:
        if isinstance(msg, AddRequests):
            for r in msg.requests:
                self.core.add_request(Request(r.request_id, r.prompt_token_ids, r.sampling_params,
                                              eos_token_ids=tuple(r.eos_token_ids), arrival_time=r.arrival_time,
                                              tenancy=r.tenancy or NO_TENANCY, kv_transfer_params=r.kv_transfer_params, lora_name=r.lora_name))
        elif isinstance(msg, AbortRequests):
            self.core.abort_requests(msg.request_ids)
        elif isinstance(msg, AddLoRA | RemoveLoRA):
            try:
                self.core.add_lora(msg.name, msg.path) if isinstance(msg, AddLoRA) else self.core.remove_lora(msg.name)
            except ValueError as e:  # the front end checked it; log what still went wrong
                logger.error("LoRA adapter %r: %s", msg.name, e)
        else:
            self.running = False


if __name__ == "__main__":
    run_engine_core(msgspec.json.decode(sys.argv[1], type=EngineArgs), sys.argv[2], sys.argv[3], os.getppid(),
                    int(sys.argv[4]))
