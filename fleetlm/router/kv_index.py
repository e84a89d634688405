"""The precise prefix index: which block hashes each replica holds, from its KV events.

``KVIndex`` applies ``KVEventBatch``es per replica; ``matched_blocks(name, hashes)`` counts the
leading hashes of a prompt that replica holds. ``KVEventSubscriber`` is one asyncio task per
replica reading its ZMQ PUB endpoint. A gap in a publisher's sequence numbers (PUB drops what a
slow or late subscriber missed) clears that replica's set: a stale "held" would send requests
to a replica that no longer has the blocks, a missing one only costs a guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from fleetlm.core.kv_events import (
    TOPIC,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
)

logger = logging.getLogger("fleetlm.router")


class KVIndex:
    def __init__(self) -> None:
        self.blocks: dict[str, set[bytes]] = {}
        self._next_seq: dict[str, int] = {}
        self.num_gaps = 0

    def apply(self, name: str, batch: KVEventBatch) -> None:
        held = self.blocks.setdefault(name, set())
        expected = self._next_seq.get(name)
        if expected is not None and batch.seq != expected:
            held.clear()
            self.num_gaps += 1
        self._next_seq[name] = batch.seq + 1
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                held.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                held.difference_update(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                held.clear()

    def matched_blocks(self, name: str, hashes: Sequence[bytes]) -> int:
        held = self.blocks.get(name)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def forget(self, name: str) -> None:
        self.blocks.pop(name, None)
        self._next_seq.pop(name, None)


class KVEventSubscriber:
    """Reads one replica's KV events into the index until ``stop()``."""

    def __init__(self, index: KVIndex, name: str, endpoint: str) -> None:
        self.index, self.name, self.endpoint = index, name, endpoint
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-events {self.name}")

    async def _run(self) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, TOPIC)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(self.endpoint)
        try:
            while True:
                parts = await sock.recv_multipart()
                if len(parts) != 3:
                    continue
                try:
                    self.index.apply(self.name, decode_batch(parts[2]))
                except Exception as e:  # a malformed message must not kill the subscriber
                    logger.warning("bad KV event batch from %s: %s", self.name, e)
        finally:
            sock.close(linger=0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self.index.forget(self.name)
