"""KV events: a replica tells the world which prefix blocks it holds (block stored / removed).

The engine core's ``BlockPool`` calls a sink (``stored``/``removed``/``cleared``) as blocks
enter and leave its prefix-cache map; ``KVEventPublisher`` batches those calls and sends one
``KVEventBatch`` per engine step over a ZMQ PUB socket (multipart: topic ``b"kv"``, an 8-byte
big-endian sequence number, msgpack payload). A router (``fleetlm.router.kv_index``) subscribes
and keeps, per replica, the set of block hashes it can hit.

The hashes are the engine's stable sha256 chain hashes (``core/block_pool.hash_block``): the
router computes the same ones from the prompt's token ids, so "how many leading blocks of this
prompt does replica R hold" is a dictionary walk.

Invariant for subscribers: batches are numbered 0, 1, 2, ... per publisher. PUB drops messages a
slow or late subscriber missed, so a gap in the numbers means the subscriber's view of that
replica is incomplete: it must forget what it knew (``KVEventBatch.seq`` tells it).
"""

from __future__ import annotations

import time
from urllib.parse import urlparse

import msgspec

TOPIC = b"kv"


class BlockStored(msgspec.Struct, tag="stored", array_like=True):
    block_hashes: list[bytes]  # in chain order; each one's parent is the one before
    parent_hash: bytes | None  # parent of the first (None: the sequence's first block)


class BlockRemoved(msgspec.Struct, tag="removed", array_like=True):
    block_hashes: list[bytes]


class AllBlocksCleared(msgspec.Struct, tag="cleared", array_like=True):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True):
    seq: int
    ts: float
    events: list[KVEvent]


def check_endpoint(endpoint: str) -> str:
    """``tcp://host:port`` or ``ipc://path`` (ValueError otherwise)."""
    u = urlparse(endpoint)
    if u.scheme == "ipc" and (u.netloc or u.path):
        return endpoint
    if u.scheme == "tcp" and u.hostname and u.port:
        return endpoint
    raise ValueError(f"kv_events_endpoint must be tcp://HOST:PORT or ipc://PATH, got {endpoint!r}")


def offset_endpoint(endpoint: str, i: int) -> str:
    """The endpoint of data-parallel rank ``i``: tcp ports count up from the given one; ipc
    paths get a ``-i`` suffix. Rank 0 keeps the endpoint as given."""
    if i == 0:
        return endpoint
    u = urlparse(endpoint)
    if u.scheme == "tcp":
        return f"tcp://{u.hostname}:{u.port + i}"
    return f"{endpoint}-{i}"


class KVEventPublisher:
    """The sink a ``BlockPool`` calls, plus the PUB socket; ``flush()`` once per engine step."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.endpoint = check_endpoint(endpoint)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, 10_000)
        self._sock.bind(endpoint)
        self._enc = msgspec.msgpack.Encoder()
        self._events: list[KVEvent] = []
        self.seq = 0

    # -- the BlockPool's sink ---------------------------------------------------------------------
    def stored(self, block_hash: bytes, parent_hash: bytes | None) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockStored) and last.block_hashes[-1] == parent_hash:
            last.block_hashes.append(block_hash)  # extend the chain in one event
        else:
            self._events.append(BlockStored([block_hash], parent_hash))

    def removed(self, block_hash: bytes) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockRemoved):
            last.block_hashes.append(block_hash)
        else:
            self._events.append(BlockRemoved([block_hash]))

    def cleared(self) -> None:
        self._events = [AllBlocksCleared()]

    # -- publishing -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Send what accumulated since the last flush as one batch (nothing if empty)."""
        if not self._events:
            return
        import zmq

        batch = KVEventBatch(self.seq, time.time(), self._events)
        self._events = []
        try:
            self._sock.send_multipart([TOPIC, self.seq.to_bytes(8, "big"), self._enc.encode(batch)],
                                      flags=zmq.NOBLOCK)
        except zmq.Again:  # a full queue drops the batch; the gap in seq tells subscribers
            pass
        self.seq += 1

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


def attach_publisher(core, endpoint: str | None) -> KVEventPublisher | None:
    """Make ``core``'s block pool report to a new publisher bound at ``endpoint`` (None: none)."""
    if endpoint is None:
        return None
    pub = KVEventPublisher(endpoint)
    core.scheduler.kv.pool.event_sink = pub
    return pub


def decode_batch(payload: bytes) -> KVEventBatch:
    return _DECODER.decode(payload)


_DECODER = msgspec.msgpack.Decoder(KVEventBatch)
