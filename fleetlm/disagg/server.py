"""The producer's side: an outbox of staged prefills and the control channel that serves it.

``KVOutbox`` holds each finished prefill's K/V (``Staged``) under its transfer id until the
consumer releases it or ``handle_ttl_s`` passes; its bytes are bounded by ``max_staged_bytes``.
``KVServer`` is one background thread with a ZMQ ROUTER socket on the configured address,
answering ``Hello`` (the engine fingerprint, for the consumer's handshake), ``Lookup``,
``Fetch`` (through the transport), ``Release`` and ``Join`` (torch_distributed groups). The
engine thread only ever calls ``KVOutbox.put``; everything else runs on the server thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import msgspec

from fleetlm.disagg.meta import (
    EngineFingerprint,
    Fetch,
    Hello,
    Join,
    Lookup,
    Release,
    Reply,
    Request,
    TransferMeta,
)
from fleetlm.disagg.transports import Staged, Transport

logger = logging.getLogger("fleetlm")


@dataclass
class _Entry:
    meta: TransferMeta
    staged: Staged


class KVOutbox:
    def __init__(self, transport: Transport, ttl_s: float, max_bytes: int) -> None:
        self.transport = transport
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self.staged_bytes = 0
        self.num_expired = 0

    def put(self, meta: TransferMeta, staged: Staged) -> None:
        with self._lock:
            if self.staged_bytes + staged.nbytes > self.max_bytes:
                staged.drop()
                raise RuntimeError(f"kv transfer: staging {staged.nbytes} bytes would exceed max_staged_bytes "
                                   f"({self.max_bytes}); {len(self._entries)} transfers wait for their consumer")
            self._entries[meta.transfer_id] = _Entry(meta, staged)
            self.staged_bytes += staged.nbytes

    def get(self, transfer_id: str) -> _Entry | None:
        with self._lock:
            e = self._entries.get(transfer_id)
        if e is not None and e.meta.expires_at < time.time():
            self.release(transfer_id, expired=True)
            return None
        return e

    def release(self, transfer_id: str, expired: bool = False) -> bool:
        with self._lock:
            e = self._entries.pop(transfer_id, None)
            if e is None:
                return False
            self.staged_bytes -= e.staged.nbytes
            self.num_expired += expired
        e.staged.drop()
        return True

    def sweep(self) -> None:
        now = time.time()
        with self._lock:
            old = [tid for tid, e in self._entries.items() if e.meta.expires_at < now]
        for tid in old:
            self.release(tid, expired=True)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        for tid in list(self._entries):
            self.release(tid)


class KVServer:
    def __init__(self, address: str, outbox: KVOutbox, engine: EngineFingerprint, public: str | None = None) -> None:
        import zmq

        self.address, self.outbox, self.engine = address, outbox, engine
        self.host = (public or address).rpartition(":")[0]  # where consumers reach it (gloo groups)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(f"tcp://{address}")
        except zmq.ZMQError as e:
            self._sock.close()
            self._ctx.term()
            raise ValueError(f"kv_transfer_config.address {address}: cannot listen there ({e})") from None
        self._dec = msgspec.msgpack.Decoder(Request)
        self._enc = msgspec.msgpack.Encoder()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="kv-server")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(100):
                ident, _, body = self._sock.recv_multipart()
                try:
                    reply, frames = self._answer(self._dec.decode(body))
                except Exception as e:  # noqa: BLE001 - a bad request must not stop the server
                    reply, frames = Reply(False, f"{type(e).__name__}: {e}"), []
                self._sock.send_multipart([ident, b"", self._enc.encode(reply), *frames], copy=False)
            self.outbox.sweep()
        self._sock.close(linger=0)
        self._ctx.term()

    def _answer(self, msg) -> tuple[Reply, list]:
        if isinstance(msg, Hello):
            return Reply(True, engine=self.engine), []
        if isinstance(msg, Join):
            return Reply(True, info=self.outbox.transport.join(msg.peer, self.host)), []
        if isinstance(msg, Release):
            self.outbox.release(msg.transfer_id)
            return Reply(True), []
        entry = self.outbox.get(msg.transfer_id)
        if entry is None:
            return Reply(False, f"unknown or expired kv transfer handle {msg.transfer_id!r}", info={"unknown": True}), []
        if isinstance(msg, Lookup):
            return Reply(True, meta=entry.meta), []
        assert isinstance(msg, Fetch)
        if not 0 <= msg.first_block <= entry.meta.num_blocks:
            raise ValueError(f"first_block {msg.first_block} is outside 0..{entry.meta.num_blocks}")
        info, frames = self.outbox.transport.serve(entry.staged, msg.first_block, msg.peer)
        return Reply(True, meta=entry.meta, info=info), frames

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.outbox.clear()
