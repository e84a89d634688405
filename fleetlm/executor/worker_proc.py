"""Body of a worker process (rank >= 1): started by ``MultiprocExecutor`` or by ``torchrun``.

It joins ``torch.distributed``, loads its own shard of the model from the model path, connects to
the driver's ZMQ endpoints (received through a gloo broadcast) and serves calls until
``shutdown``. A step that raised is answered with the phase it raised in; one that raised inside
the forward pass (collectives half done) ends this process, so the other ranks fail fast
instead of waiting in a collective.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import tempfile
import uuid

import msgspec
import torch
import torch.distributed as dist

from fleetlm.config import EngineArgs
from fleetlm.distributed.parallel_state import (
    ParallelConfig,
    get_cpu_group,
    init_distributed,
    reachable_address,
)

logger = logging.getLogger("fleetlm")


def run_worker(args: EngineArgs, rank: int, init_method: str | None, local_ranks: int) -> None:
    import zmq

    from fleetlm.engine.processor import load_engine_parts
    from fleetlm.executor.multiproc import StepFailure
    from fleetlm.worker.worker import Worker

    parent = os.getppid()  # the driver (when spawned): if it goes, so does this worker
    pcfg = ParallelConfig(args.tensor_parallel_size, args.pipeline_parallel_size)
    init_distributed(pcfg, rank, torch.device(args.resolved_device), init_method=init_method)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    if init_method is None:  # torchrun, possibly another node: TCP
        host = reachable_address()  # this interface only, never all of them
        port = inbox.bind_to_random_port(f"tcp://{host}")
        my_addr = f"tcp://{host}:{port}"
    else:
        my_addr = f"ipc://{tempfile.gettempdir()}/fleetlm-{os.getpid()}-{uuid.uuid4().hex[:8]}-w{rank}"
        inbox.bind(my_addr)
    box = [None]
    dist.broadcast_object_list(box, src=0, group=get_cpu_group())
    dist.all_gather_object([None] * pcfg.world_size, my_addr, group=get_cpu_group())
    out = ctx.socket(zmq.PUSH)
    out.connect(box[0])
    files, dtype, max_model_len = load_engine_parts(args)
    worker = Worker(args, dtype, max_model_len, local_ranks=local_ranks)
    worker.load_model(files)
    try:
        while True:
            while not inbox.poll(500):
                if init_method is not None and os.getppid() != parent:  # the driver is gone
                    logger.warning("rank %d: driver gone; exiting", rank)
                    return
            cid, method, call_args = pickle.loads(inbox.recv())
            if method == "shutdown":
                return
            try:
                reply = (cid, rank, True, getattr(worker, method)(*call_args))
            except Exception as e:  # noqa: BLE001 - reported to the driver, which decides
                phase = worker.runner.phase if worker.runner is not None else "prepare"
                logger.error("rank %d: %s failed in %s: %s: %s", rank, method, phase, type(e).__name__, e)
                reply = (cid, rank, False, StepFailure(phase, f"{type(e).__name__}: {e}"))
                out.send(pickle.dumps(reply))
                if method == "execute_model" and phase == "forward":
                    out.close(linger=2000)
                    os._exit(1)
                continue
            out.send(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        out.close(linger=1000)
        inbox.close(linger=0)
        if my_addr.startswith("ipc://"):
            try:
                os.unlink(my_addr.removeprefix("ipc://"))
            except OSError:
                pass


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s fleetlm.rank{sys.argv[2]}: %(message)s")
    run_worker(msgspec.json.decode(sys.argv[1], type=EngineArgs), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
