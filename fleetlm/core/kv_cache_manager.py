"""Maps requests to KV blocks: prefix-cache lookup, slot allocation and freeing.

Rules:
- A request's blocks are ``req_to_blocks[request_id]`` in token order; block ``i`` holds tokens
  ``[i*block_size, (i+1)*block_size)``.
- A block is inserted in the prefix cache as soon as it is full of tokens whose K/V are written
  in the step being scheduled (K/V are written for the whole batch before any attention reads,
  so a later request of the same step may already hit it). If that step fails, ``rollback``
  withdraws the step's insertions, so no one ever hits K/V that was not written; ``commit``
  after a successful step makes them permanent. With several steps in flight (pipeline
  parallelism) a block inserted by a step still in flight is hittable by that step only.
- A hit never covers the last prompt token: there must be logits to sample from.
- Requests that need prompt logprobs skip the cache lookup (their logits must be computed).
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm.core.block_pool import BlockPool, KVCacheBlock, block_extra_keys, hash_block
from fleetlm.request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens actually served from the cache (not recomputed)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.stats = PrefixCacheStats()
        self._step_inserted: list[KVCacheBlock] = []  # by the step being scheduled
        self._pending: dict[int, list[KVCacheBlock]] = {}  # step id -> its insertions, until commit
        self.current_step = 0
        self._num_walked: dict[str, int] = {}  # per request: leading full blocks already offered to the cache

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, req: Request, num_tokens: int) -> None:
        """Extend ``req.block_hashes`` to cover every full block of the first ``num_tokens``."""
        bs, t = self.block_size, req.tenancy
        for i in range(len(req.block_hashes), num_tokens // bs):
            parent = req.block_hashes[i - 1] if i else None
            extra = block_extra_keys(i, bs, t.cache_salt, t.shared_prefix_tokens, t.shared_salt, req.lora_name)
            req.block_hashes.append(hash_block(parent, req.token_slice(i * bs, (i + 1) * bs), extra))

    def get_computed_blocks(self, req: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of ``req`` (full blocks only), and how many tokens it covers."""
        if not self.enable_caching or req.sampling_params.prompt_logprobs is not None:
            return [], 0
        bs = self.block_size
        max_hit_blocks = (req.num_tokens - 1) // bs
        self._update_hashes(req, max_hit_blocks * bs)
        hits: list[KVCacheBlock] = []
        for i in range(max_hit_blocks):
            parent = req.block_hashes[i - 1] if i else None
            block = self.pool.match(req.block_hashes[i], parent, req.token_slice(i * bs, (i + 1) * bs))
            if block is None or block.pending_step not in (None, self.current_step):
                break
            hits.append(block)
        if req.num_preemptions == 0:
            self.stats.queries += req.num_prompt_tokens
            self.stats.hits += len(hits) * bs
        return hits, len(hits) * bs

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[KVCacheBlock] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Give ``req`` blocks for ``num_new_tokens`` more tokens after its computed ones (plus
        any prefix hit in ``computed_blocks``) and ``num_lookahead_tokens`` slots past them (a
        speculative draft's own cache writes there). Returns the new blocks, or ``None`` (and
        changes nothing) if the pool cannot supply them. Only known tokens are ever hashed: draft
        tokens scheduled past ``req.num_tokens`` never enter the prefix cache."""
        computed_blocks = computed_blocks or []
        blocks = self.req_to_blocks.setdefault(req.request_id, [])
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        need = self.blocks_needed(total + num_lookahead_tokens) - len(blocks) - len(computed_blocks)
        evictable_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - evictable_hits:
            if not blocks:
                del self.req_to_blocks[req.request_id]
            return None
        self.pool.touch(computed_blocks)
        blocks.extend(computed_blocks)
        new = self.pool.get_new_blocks(max(need, 0))
        blocks.extend(new)
        if self.enable_caching:
            self._cache_full_blocks(req, blocks, min(total, req.num_tokens))
        return new

    def allocate_remote(self, req: Request, hits: list[KVCacheBlock], num_tokens: int) -> list[KVCacheBlock] | None:
        """Blocks for the first ``num_tokens`` of a request whose K/V another engine computed
        (``fleetlm/disagg``): ``hits`` (its cached prefix) are taken, the rest allocated but NOT
        offered to the prefix cache: their K/V is not here yet (``cache_remote`` once it is).
        Returns the new blocks, or None (nothing changed) if the pool cannot supply them."""
        need = self.blocks_needed(num_tokens) - len(hits)
        if need > self.pool.num_free_blocks - sum(1 for b in hits if b.ref_cnt == 0):
            return None
        self.pool.touch(hits)
        new = self.pool.get_new_blocks(max(need, 0))
        self.req_to_blocks[req.request_id] = list(hits) + new
        self._num_walked[req.request_id] = len(hits)
        return new

    def cache_remote(self, req: Request, num_tokens: int) -> None:
        """The received K/V of the first ``num_tokens`` is written: its full blocks join the
        prefix cache (so the next turn of the conversation hits them)."""
        if self.enable_caching:
            scheduling, self._step_inserted = self._step_inserted, []
            self._cache_full_blocks(req, self.req_to_blocks[req.request_id], num_tokens)
            for b in self._step_inserted:  # written already: no step to wait for
                b.pending_step = None
            self._step_inserted = scheduling

    def _cache_full_blocks(self, req: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        bs = self.block_size
        self._update_hashes(req, num_tokens)
        start, end = self._num_walked.get(req.request_id, 0), num_tokens // bs
        self._num_walked[req.request_id] = max(start, end)
        for i in range(start, end):  # each block is offered once, not on every step
            if blocks[i].block_hash is None:
                parent = req.block_hashes[i - 1] if i else None
                if self.pool.insert(blocks[i], req.block_hashes[i], parent, req.token_slice(i * bs, (i + 1) * bs)):
                    blocks[i].pending_step = self.current_step
                    self._step_inserted.append(blocks[i])

    def begin_step(self, step_id: int) -> None:
        self.current_step = step_id

    def seal_step(self) -> None:
        """Scheduling of the current step is done: its insertions wait for commit or rollback."""
        if self._step_inserted:
            self._pending[self.current_step] = self._step_inserted
            self._step_inserted = []

    def commit(self, step_id: int) -> None:
        """The step ran: the blocks it inserted hold real K/V."""
        for block in self._pending.pop(step_id, []):
            if block.pending_step == step_id:
                block.pending_step = None

    def rollback(self, step_id: int) -> set[int]:
        """The step failed: withdraw what it inserted in the prefix cache. Returns the ids of
        the withdrawn blocks (their K/V was never written, also for requests of that step that
        hit them)."""
        withdrawn = set()
        for block in self._pending.pop(step_id, []):
            if block.pending_step == step_id:
                self.pool.uncache(block)
                withdrawn.add(block.block_id)
        self._num_walked.clear()  # offer them again once they are really computed
        return withdrawn

    def free(self, req: Request) -> None:
        """Return all of ``req``'s blocks (tail first, so tails are evicted before shared heads)."""
        blocks = self.req_to_blocks.pop(req.request_id, [])
        self._num_walked.pop(req.request_id, None)
        self.pool.free_blocks(reversed(blocks))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
