from fleetlm.core.block_pool import BlockPool, hash_block
from fleetlm.core.kv_cache_manager import KVCacheManager
from fleetlm.request import Request
from fleetlm.sampling_params import SamplingParams


def test_ref_counts_and_free_count():
    pool = BlockPool(8)
    a = pool.get_new_blocks(3)
    assert pool.num_free_blocks == 5 and all(b.ref_cnt == 1 for b in a)
    pool.touch(a[:1])
    assert a[0].ref_cnt == 2
    pool.free_blocks(a)
    assert pool.num_free_blocks == 7 and a[0].ref_cnt == 1
    pool.free_blocks(a[:1])
    assert pool.num_free_blocks == 8


def test_lru_eviction_order_and_hit_until_evicted():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    hashes = [hash_block(None, [i]) for i in range(4)]
    for b, h, i in zip(blocks, hashes, range(4)):
        pool.insert(b, h, None, [i])
    pool.free_blocks([blocks[2], blocks[0], blocks[3], blocks[1]])  # LRU order 2,0,3,1
    assert pool.match(hashes[2], None, [2]) is blocks[2]  # freed blocks stay hittable
    got = pool.get_new_blocks(2)
    assert [b.block_id for b in got] == [2, 0]  # least recently freed first
    assert pool.match(hashes[2], None, [2]) is None and pool.match(hashes[0], None, [0]) is None
    assert pool.match(hashes[3], None, [3]) is blocks[3]
    assert pool.num_evictions == 2


def test_token_check_rejects_hash_collision():
    pool = BlockPool(2)
    (b,) = pool.get_new_blocks(1)
    pool.insert(b, 1234, None, [5, 6])
    assert pool.match(1234, None, [5, 6]) is b
    assert pool.match(1234, None, [5, 7]) is None  # same hash, other tokens: no hit
    assert pool.match(1234, 99, [5, 6]) is None  # other parent: no hit


def test_hash_chain_depends_on_every_earlier_block():
    h1 = hash_block(None, [1, 2])
    assert hash_block(h1, [3, 4]) != hash_block(hash_block(None, [9, 2]), [3, 4])
    assert hash_block(h1, [3, 4]) == hash_block(hash_block(None, [1, 2]), [3, 4])


def _req(rid, tokens, **sp):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4, **sp))


def test_prefix_hit_shares_blocks_and_never_covers_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = _req("a", range(12))
    assert kv.get_computed_blocks(a) == ([], 0)
    kv.allocate_slots(a, 12)
    b = _req("b", list(range(8)) + [50, 51, 52, 53])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [h.block_id for h in hits] == kv.block_ids("a")[:2]
    kv.allocate_slots(b, 4, hits)
    assert [blk.ref_cnt for blk in kv.req_to_blocks["a"][:2]] == [2, 2]
    c = _req("c", range(12))  # identical prompt: the last block must be recomputed
    hits, n = kv.get_computed_blocks(c)
    assert n == 8
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 16
    assert kv.stats.queries == 36 and kv.stats.hits == 16


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = _req("a", range(8))
    kv.allocate_slots(a, 8)
    b = _req("b", range(100, 108))
    assert kv.allocate_slots(b, 8) is None
    assert kv.num_free_blocks == 1 and "b" not in kv.req_to_blocks


def test_prompt_logprobs_requests_skip_the_cache_and_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots(_req("a", range(9)), 9)
    assert kv.get_computed_blocks(_req("b", range(9), prompt_logprobs=1))[1] == 0
    off = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    off.allocate_slots(_req("a", range(9)), 9)
    assert off.get_computed_blocks(_req("b", range(9)))[1] == 0


def test_rollback_withdraws_blocks_of_a_failed_step():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = _req("a", range(9))
    kv.begin_step(0)
    kv.allocate_slots(a, 9)  # two full blocks inserted while scheduling
    kv.seal_step()
    kv.rollback(0)  # ... and the step failed
    kv.free(a)
    assert kv.get_computed_blocks(_req("b", range(9)))[1] == 0
    c = _req("c", range(9))
    kv.begin_step(1)
    kv.allocate_slots(c, 9)
    kv.seal_step()
    kv.commit(1)
    kv.free(c)
    assert kv.get_computed_blocks(_req("d", range(9)))[1] == 8


def test_blocks_of_a_step_in_flight_are_hit_only_by_that_step():
    """Pipeline parallelism: step 1 may not read K/V that step 0 has not finished writing."""
    kv = KVCacheManager(num_blocks=16, block_size=4)
    kv.begin_step(0)
    kv.allocate_slots(_req("a", range(9)), 9)
    assert kv.get_computed_blocks(_req("same-step", range(9)))[1] == 8  # same step: written first
    kv.seal_step()
    kv.begin_step(1)
    assert kv.get_computed_blocks(_req("next-step", range(9)))[1] == 0
    kv.seal_step()
    kv.commit(0)
    kv.begin_step(2)
    assert kv.get_computed_blocks(_req("after-commit", range(9)))[1] == 8


def test_block_hashes_are_equal_across_processes():
    """Two interpreters with different hash seeds give the same chain of block digests."""
    import subprocess
    import sys

    code = ("from fleetlm.core.block_pool import hash_block\n"
            "h = None\n"
            "for i in range(3):\n"
            "    h = hash_block(h, list(range(16 * i, 16 * i + 16)), ('salt', 7))\n"
            "print(h.hex())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin"}).stdout.strip()
               for seed in ("1", "2")}
    assert len(digests) == 1 and len(digests.pop()) == 64
    from fleetlm.core.block_pool import hash_block

    assert hash_block(None, [1, 2]) != hash_block(None, [1, 2], ("tenant-a",)) != hash_block(None, [2, 1])
