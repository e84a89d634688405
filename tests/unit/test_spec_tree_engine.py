"""Tree verification through the whole engine (tiny random Llama, fp32): outputs and log-probs
equal the engine without speculation for eagle and medusa trees; an oracle Medusa that puts the
true continuation on a random path of the tree (ranks > 0 included) makes the accepted nodes'
K/V move onto the path, which later tokens, prefix-cache hits and preemption must all see right;
blocks return to the pool and no draft is ever hashed."""

from __future__ import annotations

import random

import pytest

from fleetlm import LLM, SamplingParams
from fleetlm.spec_decode import medusa as medusa_mod
from fleetlm.spec_decode.heads import random_eagle_head, random_medusa_heads
from tests.unit.test_spec_stress import _prefix, _record_finals, _record_inserts

PROMPTS = [
    "one two three four five six one two three four five six one two three",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return",
    "Hello",
    "The cat sat on the mat. The cat sat on the mat. The cat",
]
ENGINE = dict(dtype="float32", kv_cache_memory=32 << 20, max_model_len=512)
TREE = {"num_speculative_tokens": 3, "adaptive": False, "verification": "tree"}


@pytest.fixture(scope="module")
def heads(tiny_model_dir, tmp_path_factory):
    from fleetlm.models.loader import load_model_files

    cfg = load_model_files(tiny_model_dir, __import__("torch").float32).config
    d = tmp_path_factory.mktemp("tree_heads")
    return {"eagle": str(random_eagle_head(d / "eagle", cfg, std=0.2)),
            "medusa": str(random_medusa_heads(d / "medusa", cfg, num_heads=3, std=0.2))}


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=24, logprobs=2),
        SamplingParams(temperature=0.8, top_k=20, seed=1, max_tokens=16, logprobs=1),
        SamplingParams(temperature=1.0, presence_penalty=0.5, repetition_penalty=1.2, seed=2, max_tokens=16,
                       min_tokens=5),
        SamplingParams(temperature=0, max_tokens=20, stop=["six"]),
    ]


def _key(outs):
    return [[(c.token_ids, c.finish_reason, c.text,
              [(t, round(lp.logprob, 4)) for d in (c.logprobs or []) for t, lp in d.items()]) for c in o.outputs]
            for o in outs]


class Oracle:
    """Medusa tree drafts that know the reference continuations: per request and step, a random
    path of the tree carries the true next tokens (right for a random number of levels), every
    other node a wrong token."""

    def __init__(self, refs: list[list[int]], seed: int = 0) -> None:
        self.refs, self.rng = refs, random.Random(seed)

    def __call__(self, proposer, batch, items, tree):
        out = {}
        for it in items:
            seq = it.token_ids
            ref = next((r for r in self.refs if len(r) > len(seq) and r[: len(seq)] == seq), None)
            n = tree.num_nodes(it.num_drafts)
            paths = tree.paths[:n]
            true = ref[len(seq):] if ref else []
            target = self.rng.choice([p for p in paths if not any(q[: len(p)] == p and q != p for q in paths)])
            right = self.rng.randint(0, len(target))
            nodes = []
            for p in paths:
                d = len(p)
                truth = true[d - 1] if d - 1 < len(true) else 7
                on_path = d <= right and p == target[:d]
                nodes.append(truth if on_path else (truth + 1 + p[-1]) % 49152)
            out[it.req_id] = nodes
        return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return LLM(str(tiny_model_dir), **ENGINE)


@pytest.mark.parametrize("method", ["eagle", "medusa"])
def test_tree_outputs_equal_without_speculation(method, tiny_model_dir, heads, reference):
    want = reference.generate(PROMPTS, _params(), use_tqdm=False)
    llm = LLM(str(tiny_model_dir), speculative_config={"method": method, "model": heads[method], **TREE}, **ENGINE)
    got = llm.generate(PROMPTS, _params(), use_tqdm=False)
    assert _key(got) == _key(want)
    stats = llm.engine.core.scheduler.spec.stats
    assert stats.num_drafts > 0 and stats.num_draft_tokens <= 3 * stats.num_drafts  # depth, not nodes, counted
    assert llm.engine.core.scheduler.kv.num_free_blocks == llm.engine.core.cache_config.num_blocks


def test_accepted_paths_move_their_kv(tiny_model_dir, heads, reference, monkeypatch):
    """Paths through rank-1/2 nodes get accepted; outputs, log-probs and later prefix-cache hits
    on the generated text must be the target's."""
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)
    want = reference.generate(PROMPTS, greedy, use_tqdm=False)
    refs = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in want]
    monkeypatch.setattr(medusa_mod, "medusa_tree", Oracle(refs))
    llm = LLM(str(tiny_model_dir), speculative_config={"method": "medusa", "model": heads["medusa"], **TREE},
              **ENGINE)
    got = llm.generate(PROMPTS, greedy, use_tqdm=False)
    assert _key(got) == _key(want)
    sched = llm.engine.core.scheduler
    assert sched.spec.stats.accepted_per_pos[1] > 10  # deep paths were accepted
    longer = [{"prompt_token_ids": r[:-5]} for r in refs]  # hits the blocks written from moved K/V
    hits = sched.kv.stats.hits
    again = llm.generate(longer, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert sched.kv.stats.hits - hits >= 4 * 2 * 16
    assert [list(o.outputs[0].token_ids) for o in again] == [r[-5:] for r in refs]
    assert sched.kv.num_free_blocks == llm.engine.core.cache_config.num_blocks


def test_small_stress_with_chunked_prefill_preemption_and_prefix_caching(tiny_model_dir, heads, reference,
                                                                        monkeypatch):
    rng = random.Random(1)
    shared = [rng.randrange(100, 40000) for _ in range(40)]
    prompts = [shared[: rng.choice([0, 17, 40])] + [rng.randrange(100, 40000) for _ in range(rng.randrange(1, 40))]
               for _ in range(16)]
    params = [rng.choice([SamplingParams(temperature=0, max_tokens=rng.randrange(4, 30), ignore_eos=True),
                          SamplingParams(temperature=0.9, seed=i, max_tokens=rng.randrange(4, 20), ignore_eos=True)])
              for i in range(len(prompts))]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    want = reference.generate(inputs, params, use_tqdm=False)
    refs = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, want)]
    monkeypatch.setattr(medusa_mod, "medusa_tree", Oracle(refs, seed=2))
    llm = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=12, max_model_len=192, max_num_batched_tokens=48,
              speculative_config={"method": "medusa", "model": heads["medusa"], **TREE})
    sched = llm.engine.core.scheduler
    seen, finals = _record_inserts(sched.kv), _record_finals(sched)
    got = llm.generate(inputs, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert sched.num_preemptions > 0 and sched.spec.stats.num_accepted_tokens > 0
    assert sched.kv.num_free_blocks == llm.engine.core.cache_config.num_blocks
    finals_set = {tuple(f) for f in finals}
    for h in seen:  # every hashed block holds known tokens of some request: no tree node was hashed
        p = _prefix(seen, h)
        assert any(f[: len(p)] == tuple(p) for f in finals_set)


def _record_drafts(llm) -> dict[tuple[str, int], list[int]]:
    spec, seen = llm.engine.core.scheduler.spec, {}
    on_output = spec.on_output

    def spy(req, emitted, new_drafts):
        if new_drafts:
            seen[(req.request_id, req.num_tokens + len(emitted))] = list(new_drafts)
        return on_output(req, emitted, new_drafts)

    spec.on_output = spy
    return seen


def test_eagle_tree_top_path_equals_the_chain(tiny_model_dir, heads):
    """The EAGLE head's tree pass (tree mask over its own cache, depth positions, parent
    features) drafts along ranks (0,), (0,0), (0,0,0) exactly what the chain drafts."""
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base = {"method": "eagle", "model": heads["eagle"], "num_speculative_tokens": 3, "adaptive": False}
    chain = LLM(str(tiny_model_dir), speculative_config=base, **ENGINE)
    tree = LLM(str(tiny_model_dir), speculative_config={**base, "verification": "tree"}, **ENGINE)
    got_chain, got_tree = _record_drafts(chain), _record_drafts(tree)
    chain.generate(PROMPTS, greedy, use_tqdm=False)
    tree.generate(PROMPTS, greedy, use_tqdm=False)
    common = set(got_chain) & set(got_tree)
    assert len(common) >= 20
    top = [0, 3, 6]  # node indices of the top-1 chain in the default tree
    for key in common:
        c, t = got_chain[key], got_tree[key]
        assert len(t) == {1: 3, 2: 6, 3: 8}[len(c)]
        assert [t[i] for i in top[: len(c)]] == c, key
