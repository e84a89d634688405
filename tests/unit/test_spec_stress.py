"""200 mixed requests with speculation under preemption and aborts: every request ends, the
free-block count returns to its start, every block ever hashed holds known tokens of the request
that wrote it (no draft), and the cached K/V is right: continuing cached sequences gives what an
engine without speculation gives."""

from __future__ import annotations

import random

from fleetlm import LLM, SamplingParams

CFG = {"method": "draft_model", "num_speculative_tokens": 3, "adaptive": False}


def _record_inserts(kv) -> dict[bytes, tuple[bytes | None, tuple[int, ...]]]:
    seen: dict[bytes, tuple[bytes | None, tuple[int, ...]]] = {}
    insert = kv.pool.insert

    def spy(block, block_hash, parent_hash, token_ids):
        ok = insert(block, block_hash, parent_hash, token_ids)
        if ok:
            seen[block_hash] = (parent_hash, tuple(token_ids))
        return ok

    kv.pool.insert = spy
    return seen


def _record_finals(sched) -> list[list[int]]:
    finals: list[list[int]] = []
    finish = sched._finish

    def spy(req, status):
        finals.append(list(req.prompt_token_ids) + list(req.output_token_ids))
        return finish(req, status)

    sched._finish = spy
    return finals


def _prefix(seen, h) -> list[int]:
    parent, tokens = seen[h]
    return (_prefix(seen, parent) if parent is not None else []) + list(tokens)


def test_mixed_requests_with_preemption_and_aborts(tiny_model_dir):
    rng = random.Random(0)
    llm = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=48, max_model_len=256,
              speculative_config={**CFG, "model": str(tiny_model_dir)}, max_num_batched_tokens=256)
    eng, sched = llm.engine, llm.engine.core.scheduler
    seen, finals = _record_inserts(sched.kv), _record_finals(sched)
    start_free = sched.kv.num_free_blocks
    shared = [rng.randrange(100, 40000) for _ in range(40)]
    ids, done = [], set()
    for i in range(200):
        prompt = (shared[: rng.choice([0, 16, 33])] + [rng.randrange(100, 40000) for _ in range(rng.randrange(1, 30))])
        if rng.random() < 0.3:
            prompt = prompt + prompt[-8:] * 2  # something for the drafts to copy
        sp = rng.choice([
            SamplingParams(temperature=0, max_tokens=rng.randrange(1, 24)),
            SamplingParams(temperature=0.9, seed=i, max_tokens=rng.randrange(1, 24), n=rng.choice([1, 2])),
            SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[rng.randrange(100, 40000)], min_tokens=3),
            SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, disable_speculation=True),
        ])
        rid = f"r{i}"
        eng.add_request(rid, None, prompt, sp)
        ids.append(rid)
        if i % 10 == 9:
            for out in eng.step():
                done.add(out.request_id)
            if rng.random() < 0.5:
                victim = rng.choice(ids)
                if victim not in done:
                    eng.abort_request(victim)
                    done.add(victim)
    while eng.has_unfinished_requests():
        for out in eng.step():
            done.add(out.request_id)
    assert done == set(ids)
    assert sched.num_preemptions > 0
    assert sched.spec.stats.num_accepted_tokens > 0
    assert sched.kv.num_free_blocks == start_free
    # every hashed block holds a prefix of some request's known tokens: no draft was ever hashed
    finals_set = {tuple(f) for f in finals}
    for h in seen:
        p = _prefix(seen, h)
        assert any(f[: len(p)] == tuple(p) for f in finals_set), "a hashed block holds tokens no request had"


def test_cached_kv_after_speculation_is_the_targets(tiny_model_dir):
    """Sequences generated with speculation (rejections included) are cached; continuing them
    from the cache must give what an engine without speculation gives from scratch."""
    prompts = [[101 + i, 202, 303, 404, 505, 202, 303, 404, 505, 202] * 3 for i in range(6)]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    spec = LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory=32 << 20,
               speculative_config={"method": "self_spec", "num_draft_layers": 1, "num_speculative_tokens": 3,
                                   "adaptive": False})
    first = spec.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    assert spec.engine.core.scheduler.spec.stats.num_accepted_tokens < spec.engine.core.scheduler.spec.stats.num_draft_tokens
    longer = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, first)]
    hits_before = spec.engine.core.scheduler.kv.stats.hits
    again = spec.generate([{"prompt_token_ids": p} for p in longer], greedy, use_tqdm=False)
    assert spec.engine.core.scheduler.kv.stats.hits - hits_before >= 6 * 3 * 16  # output blocks were hit
    plain = LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory=32 << 20, enable_prefix_caching=False)
    want = plain.generate([{"prompt_token_ids": p} for p in longer], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in want]
