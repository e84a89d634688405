"""Costs the parallel foundation added to every step, measured in isolation (fixed seed):

- the stable block hash (sha256 over a canonical encoding) vs Python's salted ``hash`` it
  replaced, per 16-token block;
- encoding a ``SchedulerOutput`` for the workers: pickle (what the executor sends) vs msgspec
  msgpack, for a decode step of 64 requests and a prefill step of 8 x 256 tokens;
- one ZMQ PUSH/PULL round trip of that message between two processes on ipc.

    python benchmarks/control_plane.py
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import random
import time

import msgspec

from fleetlm.core.block_pool import hash_block
from fleetlm.core.sched_output import CachedRequestData, NewRequestData, SchedulerOutput
from fleetlm.sampling_params import SamplingParams


def best(fn, reps: int = 5, inner: int = 1000) -> float:
    out = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out = min(out, (time.perf_counter() - t0) / inner)
    return out


def decode_step(n: int = 64) -> SchedulerOutput:
    reqs = [CachedRequestData(f"req-{i}", [1000 + i], 300 + i, [random.randrange(49152)]) for i in range(n)]
    return SchedulerOutput([], reqs, {r.req_id: 1 for r in reqs}, n, step_id=7)


def prefill_step(n: int = 8, length: int = 256) -> SchedulerOutput:
    sp = SamplingParams(max_tokens=128, temperature=0.7, top_p=0.9, seed=1)
    reqs = [NewRequestData(f"req-{i}", [random.randrange(49152) for _ in range(length)], [], sp,
                           list(range(i * 17, i * 17 + 17)), 0) for i in range(n)]
    return SchedulerOutput(reqs, [], {r.req_id: length for r in reqs}, n * length, step_id=8)


def _echo(addr_in: str, addr_out: str, n: int) -> None:
    import zmq

    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(addr_in)
    push.connect(addr_out)
    for _ in range(n):
        pickle.loads(pull.recv())
        push.send(b"ok")


def zmq_round_trip(msg: bytes, n: int = 2000) -> float:
    import os
    import tempfile

    import zmq

    base = os.path.join(tempfile.gettempdir(), f"fleetlm-cp-{os.getpid()}")
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind(f"ipc://{base}-a")
    pull.bind(f"ipc://{base}-b")
    p = mp.get_context("spawn").Process(target=_echo, args=(f"ipc://{base}-a", f"ipc://{base}-b", n + 50))
    p.start()
    for _ in range(50):
        push.send(msg)
        pull.recv()
    t0 = time.perf_counter()
    for _ in range(n):
        push.send(msg)
        pull.recv()
    dt = (time.perf_counter() - t0) / n
    p.join()
    return dt


def main() -> None:
    random.seed(0)
    block = list(range(1000, 1016))
    parent = hash_block(None, block)
    t_sha = best(lambda: hash_block(parent, block))
    t_py = best(lambda: hash((hash((None, tuple(block), ())), tuple(block), ())))
    print(f"block hash, 16 tokens: sha256 {t_sha * 1e6:.2f} us, python hash {t_py * 1e6:.2f} us "
          f"(+{(t_sha - t_py) * 1e6:.2f} us per block)")
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(SchedulerOutput)
    for name, so in (("decode 64 reqs", decode_step()), ("prefill 8x256", prefill_step())):
        pk = pickle.dumps(so, protocol=pickle.HIGHEST_PROTOCOL)
        mp_bytes = enc.encode(so)
        t_pk = best(lambda so=so: pickle.loads(pickle.dumps(so, protocol=pickle.HIGHEST_PROTOCOL)), inner=200)
        t_mp = best(lambda so=so: dec.decode(enc.encode(so)), inner=200)
        rt = zmq_round_trip(pk)
        print(f"{name}: pickle {len(pk)} B {t_pk * 1e6:.0f} us | msgpack {len(mp_bytes)} B {t_mp * 1e6:.0f} us "
              f"(encode+decode) | zmq ipc round trip with pickle {rt * 1e6:.0f} us")


if __name__ == "__main__":
    main()
