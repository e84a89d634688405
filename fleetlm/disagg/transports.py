"""How a staged prefill's bytes reach the consumer: a registry of transports.

Every transport shares the producer's control channel (``server.py``: ZMQ, msgpack requests);
they differ in the data path of a ``Fetch``:

- ``tcp``: the bytes ride in the ZMQ reply (zero-copy frame on the producer side).
- ``shm``: the producer stages into a POSIX shared-memory segment; the reply names it and the
  consumer copies the blocks it lacks straight out of it (same host only).
- ``torch_distributed``: a two-rank gloo group per (producer, consumer) pair (NCCL would be the
  choice between GPUs); the producer ``send``s the blocks and the consumer ``recv``s them.

A producer-side object (``Staged``) holds one transfer's bytes; ``serve`` answers a fetch of the
blocks from ``first_block`` on. The consumer side's ``receive`` returns them as a uint8 tensor.
Every transport counts bytes moved and seconds (``TransportStats``), on both sides.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class TransportStats:
    """Cumulative, thread-safe: bytes moved (payload only), seconds spent moving them, transfers."""

    bytes_moved: int = 0
    seconds: float = 0.0
    transfers: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.bytes_moved += nbytes
            self.seconds += seconds
            self.transfers += 1

    def as_dict(self) -> dict[str, float]:
        return {"bytes_moved": self.bytes_moved, "seconds": self.seconds, "transfers": self.transfers}


class Staged:
    """One transfer's bytes on the producer: a flat uint8 view, block-major."""

    def __init__(self, data: torch.Tensor, bytes_per_block: int) -> None:
        self.data = data
        self.bytes_per_block = bytes_per_block

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def span(self, first_block: int) -> torch.Tensor:
        return self.data[first_block * self.bytes_per_block:]

    def drop(self) -> None:
        self.data = None


class Transport(ABC):
    name: str

    def __init__(self) -> None:
        self.stats = TransportStats()

    # -- producer side ----------------------------------------------------------------------
    def stage(self, data: torch.Tensor, bytes_per_block: int) -> Staged:
        """Keep ``data`` (uint8, contiguous, block-major) until fetched or expired."""
        return Staged(data, bytes_per_block)

    @abstractmethod
    def serve(self, staged: Staged, first_block: int, peer: str) -> tuple[dict, list]:
        """Answer a fetch: (info for the reply, extra frames after it)."""

    def join(self, peer: str, host: str) -> dict:
        raise ValueError(f"transport {self.name!r} has no peer groups")

    # -- consumer side ----------------------------------------------------------------------
    @abstractmethod
    def receive(self, info: dict, frames: list, nbytes: int) -> torch.Tensor:
        """The fetched bytes (uint8, ``nbytes`` long) from the reply ``info`` and ``frames``."""

    def peer_id(self, producer: str, client) -> str:
        return ""

    def close(self) -> None:  # noqa: B027 - most transports hold nothing
        pass


class TcpTransport(Transport):
    name = "tcp"

    def serve(self, staged: Staged, first_block: int, peer: str) -> tuple[dict, list]:
        span = staged.span(first_block)
        return {"nbytes": span.numel()}, [memoryview(span.numpy())]

    def receive(self, info: dict, frames: list, nbytes: int) -> torch.Tensor:
        t0 = time.perf_counter()
        buf = frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]
        with warnings.catch_warnings():  # read-only is fine: the consumer only copies out of it
            warnings.simplefilter("ignore", UserWarning)
            out = torch.frombuffer(buf, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        if out.numel() != nbytes:
            raise RuntimeError(f"tcp transport: expected {nbytes} bytes, got {out.numel()}")
        self.stats.add(nbytes, time.perf_counter() - t0)
        return out


class ShmTransport(Transport):
    """Same host: the staged bytes live in a shared-memory segment the consumer reads."""

    name = "shm"

    def stage(self, data: torch.Tensor, bytes_per_block: int) -> Staged:
        from multiprocessing import shared_memory

        seg = shared_memory.SharedMemory(create=True, size=max(1, data.numel()))
        _OWN_SEGMENTS.add(seg.name)
        view = torch.frombuffer(seg.buf, dtype=torch.uint8, count=data.numel()) if data.numel() else data
        view.copy_(data)
        staged = Staged(view, bytes_per_block)
        staged.segment = seg
        staged.drop = lambda: _close_segment(staged)
        return staged

    def serve(self, staged: Staged, first_block: int, peer: str) -> tuple[dict, list]:
        off = first_block * staged.bytes_per_block
        return {"segment": staged.segment.name, "offset": off, "nbytes": staged.nbytes - off}, []

    def receive(self, info: dict, frames: list, nbytes: int) -> torch.Tensor:
        from multiprocessing import resource_tracker, shared_memory

        t0 = time.perf_counter()
        seg = shared_memory.SharedMemory(name=info["segment"])
        if seg.name not in _OWN_SEGMENTS:  # the producer owns it: this process must not unlink it at exit
            try:
                resource_tracker.unregister(seg._name, "shared_memory")
            except Exception:  # noqa: BLE001 - the tracker's API is private; worst case a warning
                pass
        try:
            src = torch.frombuffer(seg.buf, dtype=torch.uint8, count=nbytes, offset=info["offset"]) if nbytes else None
            out = src.clone() if nbytes else torch.empty(0, dtype=torch.uint8)
            del src
        finally:
            seg.close()
        self.stats.add(nbytes, time.perf_counter() - t0)
        return out


_OWN_SEGMENTS: set[str] = set()  # segments this process created (and will unlink)


def _close_segment(staged: Staged) -> None:
    seg = getattr(staged, "segment", None)
    staged.data = None
    if seg is not None:
        staged.segment = None
        _OWN_SEGMENTS.discard(seg.name)
        seg.close()
        seg.unlink()


class TorchDistributedTransport(Transport):
    """gloo send/recv in a two-rank group per (producer, consumer) pair: rank 0 the producer."""

    name = "torch_distributed"
    TIMEOUT = datetime.timedelta(seconds=60)

    def __init__(self) -> None:
        super().__init__()
        self._groups: dict[str, _Group] = {}  # peer id -> group (either side)
        self._lock = threading.Lock()
        self._tag = 0

    def join(self, peer: str, host: str) -> dict:
        """Producer: open a store for ``peer`` and build the group on a thread (it blocks until
        the consumer joins)."""
        import torch.distributed as dist

        port = _free_port(host)
        store = dist.TCPStore(host, port, 2, True, timeout=self.TIMEOUT, wait_for_workers=False)
        group = _Group()
        with self._lock:
            self._groups[peer] = group
        threading.Thread(target=group.build, args=(store, 0, host), daemon=True, name="kv-gloo-join").start()
        return {"host": host, "port": port}

    def serve(self, staged: Staged, first_block: int, peer: str) -> tuple[dict, list]:
        group = self._groups.get(peer)
        if group is None:
            raise ValueError(f"torch_distributed: no group with peer {peer!r}; join first")
        span = staged.span(first_block)
        with self._lock:
            self._tag += 1
            tag = self._tag
        group.submit(lambda pg: pg.send([span], 1, tag).wait())
        return {"tag": tag, "nbytes": span.numel()}, []

    def peer_id(self, producer: str, client) -> str:
        """Consumer: this process's group with ``producer`` (joined on first use)."""
        with self._lock:
            key = f"consumer:{producer}"
            group = self._groups.get(key)
            if group is None:
                import uuid

                group = self._groups[key] = _Group()
                group.peer = uuid.uuid4().hex
                info = client.join(producer, group.peer)
                import torch.distributed as dist

                store = dist.TCPStore(info["host"], info["port"], 2, False, timeout=self.TIMEOUT)
                group.build(store, 1, _local_host_for(info["host"]))
        return group.peer

    def receive(self, info: dict, frames: list, nbytes: int) -> torch.Tensor:
        raise NotImplementedError  # the consumer receives through ``receive_from``

    def receive_from(self, producer: str, info: dict, nbytes: int) -> torch.Tensor:
        t0 = time.perf_counter()
        out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._groups[f"consumer:{producer}"].pg.recv([out], 0, info["tag"]).wait()
        self.stats.add(nbytes, time.perf_counter() - t0)
        return out

    def close(self) -> None:
        for g in self._groups.values():
            g.close()
        self._groups.clear()


class _Group:
    """A two-rank gloo group; sends run in order on one thread."""

    def __init__(self) -> None:
        self.pg = None
        self.peer = ""
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._queue: list = []
        self._cv = threading.Condition()
        self._closed = False

    def build(self, store, rank: int, host: str) -> None:
        import torch.distributed as dist

        try:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = TorchDistributedTransport.TIMEOUT
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self.pg = dist.ProcessGroupGloo(store, rank, 2, opts)
        except BaseException as e:  # noqa: BLE001 - reported to every fetch of this pair
            self.error = e
        self.ready.set()
        if rank == 0:
            threading.Thread(target=self._send_loop, daemon=True, name="kv-gloo-send").start()

    def submit(self, fn) -> None:
        with self._cv:
            self._queue.append(fn)
            self._cv.notify()

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                fn = self._queue.pop(0)
            if self.pg is not None:
                try:
                    fn(self.pg)
                except Exception:  # noqa: BLE001 - the consumer's recv times out and fails the request
                    pass

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _local_host_for(remote: str) -> str:
    """This host's address on the route to ``remote`` (what gloo binds on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((remote, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


TRANSPORTS: dict[str, type[Transport]] = {
    "shm": ShmTransport,
    "tcp": TcpTransport,
    "torch_distributed": TorchDistributedTransport,
}


def make_transport(name: str) -> Transport:
    if name not in TRANSPORTS:
        raise ValueError(f"kv transport {name!r} is not known; choose one of: {', '.join(TRANSPORTS)}")
    return TRANSPORTS[name]()
