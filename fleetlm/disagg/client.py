"""The consumer's side of the control channel: handshake, lookup, fetch, release.

One short-lived REQ socket per call (calls come from the engine thread, the fetch threads and
the HTTP front end). A handshake result is cached per producer address; a producer whose
fingerprint differs from ours is refused with ``HandshakeError`` naming the field.
"""

from __future__ import annotations

import threading

import msgspec
import torch

from fleetlm.disagg.meta import (
    EngineFingerprint,
    Fetch,
    HandshakeError,
    Hello,
    Join,
    Lookup,
    Release,
    Reply,
    TransferMeta,
    UnknownHandle,
)
from fleetlm.disagg.transports import TorchDistributedTransport, Transport


class ProducerUnreachable(ConnectionError):
    """No answer from the producer's control channel within the timeout."""


class KVClient:
    def __init__(self, transport: Transport, engine: EngineFingerprint, allowed: tuple[str, ...],
                 timeout_s: float = 30.0) -> None:
        import zmq

        self.transport, self.engine, self.allowed, self.timeout_s = transport, engine, allowed, timeout_s
        self._ctx = zmq.Context.instance()
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(Reply)
        self._checked: set[str] = set()
        self._lock = threading.Lock()

    def _call(self, producer: str, msg, timeout_s: float | None = None) -> tuple[Reply, list]:
        import zmq

        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(f"tcp://{producer}")
            sock.send(self._enc.encode(msg))
            if not sock.poll(int(1000 * (timeout_s or self.timeout_s))):
                raise ProducerUnreachable(f"kv producer {producer} did not answer within {timeout_s or self.timeout_s:g} s")
            frames = sock.recv_multipart(copy=False)
        finally:
            sock.close()
        reply = self._dec.decode(frames[0].bytes)
        return reply, frames[1:]

    def check_producer(self, producer: str) -> None:
        """The handshake: the producer is one we may fetch from and its engine matches ours."""
        if producer not in self.allowed:
            raise HandshakeError(f"kv transfer handle names producer {producer!r}, which is not in this "
                                 f"consumer's kv_transfer_config.producers ({', '.join(self.allowed) or 'none'})")
        if producer in self._checked:
            return
        reply, _ = self._call(producer, Hello(), timeout_s=min(self.timeout_s, 10.0))
        why = self.engine.mismatch(reply.engine)
        if why is not None:
            raise HandshakeError(f"kv transfer handshake with {producer} failed: {why}")
        with self._lock:
            self._checked.add(producer)

    def lookup(self, producer: str, transfer_id: str) -> TransferMeta:
        self.check_producer(producer)
        reply, _ = self._call(producer, Lookup(transfer_id), timeout_s=min(self.timeout_s, 10.0))
        return self._meta(reply, transfer_id)

    def lookup_only(self, producer: str, transfer_id: str) -> TransferMeta:
        """The staged transfer's metadata, without the fingerprint handshake (the HTTP front end
        checks what it can; the engine core checks the rest before fetching)."""
        reply, _ = self._call(producer, Lookup(transfer_id), timeout_s=min(self.timeout_s, 10.0))
        return self._meta(reply, transfer_id)

    def join(self, producer: str, peer: str) -> dict:
        reply, _ = self._call(producer, Join(peer))
        if not reply.ok:
            raise RuntimeError(f"kv transfer: joining {producer}'s group failed: {reply.error}")
        return reply.info

    def fetch(self, producer: str, transfer_id: str, first_block: int) -> tuple[TransferMeta, torch.Tensor]:
        """The staged bytes of blocks ``first_block..`` (uint8, block-major)."""
        self.check_producer(producer)
        peer = self.transport.peer_id(producer, self)
        reply, frames = self._call(producer, Fetch(transfer_id, first_block, peer))
        meta = self._meta(reply, transfer_id)
        nbytes = (meta.num_blocks - first_block) * meta.bytes_per_block
        if isinstance(self.transport, TorchDistributedTransport):
            data = self.transport.receive_from(producer, reply.info, nbytes)
        else:
            data = self.transport.receive(reply.info, frames, nbytes)
        return meta, data

    def release(self, producer: str, transfer_id: str) -> None:
        self._call(producer, Release(transfer_id), timeout_s=5.0)

    @staticmethod
    def _meta(reply: Reply, transfer_id: str) -> TransferMeta:
        if not reply.ok:
            if reply.info.get("unknown"):
                raise UnknownHandle(reply.error)
            raise RuntimeError(f"kv transfer {transfer_id!r} failed at the producer: {reply.error}")
        return reply.meta
