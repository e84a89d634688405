"""Fixed-size KV blocks with reference counts, an LRU free list and a hash-keyed prefix cache.

Invariants (checked by the unit tests):
- A block is in the free list iff its ``ref_cnt`` is 0. ``num_free_blocks`` counts exactly those.
- A free block may still carry a ``block_hash``: it stays hittable until it is handed out again,
  at which moment it is evicted from the cache map (LRU: the least recently freed goes first).
- The cache map holds at most one block per hash; a hit is only a hit if the block's stored
  parent hash and token ids equal the request's (the hash alone is never trusted).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> bytes:
    """Chain hash of one full block: it covers every token before it through ``parent_hash``.

    A stable digest (sha256 over a canonical encoding: parent digest, token ids as little-endian
    int64, extra keys as msgpack), so the same tokens give the same key in every process, on every
    machine and in every Python run (Python's ``hash`` is salted per process). Routers, KV events
    and KV transfer rely on that.
    """
    h = hashlib.sha256(parent_hash or NONE_HASH)
    h.update(array("q", token_ids).tobytes() if sys.byteorder == "little" else _le_int64(token_ids))
    if extra_keys:
        h.update(msgspec.msgpack.encode(extra_keys))
    return h.digest()


NONE_HASH = bytes(32)  # the parent of a sequence's first block


def block_extra_keys(index: int, block_size: int, cache_salt: str | None = None,
                     shared_prefix_tokens: int = 0, shared_salt: str | None = None,
                     lora_name: str | None = None) -> tuple:
    """Extra hash keys of block ``index`` of a sequence (tenant isolation, issue 15).

    The salt enters the chain once, at the first block it covers, and every later hash inherits
    it through its parent: block 0 carries the shared salt when the sequence starts with a
    shared named prefix (its full blocks are public to every tenant that opted in); the first
    block after that prefix (block 0 without one) carries the private ``cache_salt``. Routers,
    KV events and KV transfer compute the same keys, so a salted hash means the same everywhere.
    A LoRA adapter changes every block's K/V, so its name enters block 0 (the whole chain).
    """
    shared_blocks = shared_prefix_tokens // block_size if shared_salt else 0
    keys: tuple = ("lora", lora_name) if index == 0 and lora_name else ()
    if index == 0 and shared_blocks:
        return keys + ("shared", shared_salt)
    if index == shared_blocks and cache_salt:
        return keys + ("salt", cache_salt)
    return keys


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str | None = None,
                        shared_prefix_tokens: int = 0, shared_salt: str | None = None,
                        lora_name: str | None = None) -> list[bytes]:
    """The chained hashes of every full block of ``token_ids``, as the engine computes them
    (for routers and tests that predict the engine's prefix cache)."""
    out: list[bytes] = []
    for i in range(len(token_ids) // block_size):
        extra = block_extra_keys(i, block_size, cache_salt, shared_prefix_tokens, shared_salt, lora_name)
        out.append(hash_block(out[-1] if out else None, token_ids[i * block_size:(i + 1) * block_size], extra))
    return out


def _le_int64(token_ids: Sequence[int]) -> bytes:
    a = array("q", token_ids)
    a.byteswap()
    return a.tobytes()


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    parent_hash: bytes | None = None
    pending_step: int | None = None  # inserted by a step whose K/V are not yet known written
    token_ids: tuple[int, ...] | None = None  # kept for the token check on a hit

    def reset_hash(self) -> None:
        self.block_hash = self.parent_hash = self.token_ids = self.pending_step = None


class BlockPool:
    """Owns every KV block id in ``[0, num_blocks)``."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVCacheBlock] = {}
        self.num_evictions = 0
        self.event_sink = None  # KV events (core/kv_events.py): stored / removed / cleared, or None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # -- prefix cache interface: match / touch (lock) / insert / evict -------------------------
    def match(self, block_hash: bytes, parent_hash: bytes | None, token_ids: Sequence[int]) -> KVCacheBlock | None:
        """The cached block for this hash, only if its parent hash and tokens really match."""
        block = self._cached.get(block_hash)
        if block is None or block.parent_hash != parent_hash or block.token_ids != tuple(token_ids):
            return None
        return block

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on each block (a prefix hit); a free block leaves the free list."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self._free[b.block_id]
            b.ref_cnt += 1

    def insert(self, block: KVCacheBlock, block_hash: bytes, parent_hash: bytes | None, token_ids: Sequence[int]) -> bool:
        """Make a full block hittable; True if it was inserted (first writer wins per hash)."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return False
        block.block_hash, block.parent_hash, block.token_ids = block_hash, parent_hash, tuple(token_ids)
        self._cached[block_hash] = block
        if self.event_sink is not None:
            self.event_sink.stored(block_hash, parent_hash)
        return True

    def uncache(self, block: KVCacheBlock) -> None:
        """Withdraw a block from the prefix cache (its K/V turned out never to be written)."""
        if block.block_hash is not None and self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
            if self.event_sink is not None:
                self.event_sink.removed(block.block_hash)
        block.reset_hash()

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
                self.num_evictions += 1
                if self.event_sink is not None:
                    self.event_sink.removed(block.block_hash)
            block.reset_hash()

    # -- allocation -------------------------------------------------------------------------
    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Pop ``n`` blocks from the LRU end of the free list (evicting their cache entries)."""
        if n > len(self._free):
            raise ValueError(f"cannot allocate {n} blocks: only {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference per block; blocks reaching 0 join the free list's MRU end in the
        order given (so callers pass a request's blocks tail-first: tails are evicted first)."""
        for b in blocks:
            assert b.ref_cnt > 0, f"double free of block {b.block_id}"
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self._free[b.block_id] = b

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed when no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for b in self.blocks:
            b.reset_hash()
        self._cached.clear()
        if self.event_sink is not None:
            self.event_sink.cleared()
        return True
