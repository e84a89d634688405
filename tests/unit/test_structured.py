"""Structured output on a tiny random model: whatever the weights, every output matches its
constraint; the batch never waits for a grammar; a grammar that fails ends its request alone."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from fleetlm import LLM, SamplingParams
from fleetlm.structured.backend import GrammarCompilerPool, check
from fleetlm.structured.bitmask import GrammarBitmask, apply_token_bitmask
from fleetlm.structured.params import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"}},
            "required": ["kind", "ok"]}},
    "required": ["name", "age", "tags", "pet"]}
REGEX = r"[a-z]{2,5}@[a-z]{2,5}\.(com|org)"
EBNF = 'root ::= [0-9]{1,3} (" + " [0-9]{1,3}){1,3}'
EBNF_RE = r"[0-9]{1,3}( \+ [0-9]{1,3}){1,3}"


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=256)


def test_bitmask_op_equals_xgrammar_kernel():
    import xgrammar as xgr

    gen = torch.Generator().manual_seed(0)
    for vocab in (49152, 1000, 33):  # exact words, and padding bits past the vocabulary
        words = (vocab + 31) // 32
        mask = torch.randint(-(2**31), 2**31 - 1, (5, words), dtype=torch.int32, generator=gen)
        logits = torch.randn(5, vocab, generator=gen)
        ref = logits.clone()
        xgr.apply_token_bitmask_inplace(ref, mask)
        assert torch.equal(apply_token_bitmask(logits.clone(), mask), ref)


def test_bitmask_rows_follow_the_sampler_order_and_free_rows_allow_everything():
    mask = torch.tensor([[1], [2]], dtype=torch.int32)  # a: token 0 only, b: token 1 only
    gb = GrammarBitmask(("a", "b"), mask)
    rows = gb.rows_for(["x", "b", "a"])
    assert rows.tolist() == [[-1], [2], [1]]
    assert gb.rows_for(["x"]) is None
    assert gb.subset({"b"}).req_ids == ("b",) and gb.subset({"z"}) is None
    logits = apply_token_bitmask(torch.zeros(3, 32), rows)
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[1]).tolist() == [False, True] + [False] * 30


@pytest.mark.parametrize("kw, match", [
    ({"json": "{}", "regex": "a"}, "exactly one of .* got json and regex"),
    ({}, "got none"),
    ({"choice": []}, "at least one"),
    ({"choice": "ab"}, "list of strings"),
    ({"regex": ""}, "non-empty"),
])
def test_params_need_exactly_one_valid_kind(kw, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**kw)


@pytest.mark.parametrize("kw, match", [
    ({"json": {"type": "foo"}}, 'json is invalid: Unsupported type "foo"'),
    ({"json": "not json{"}, "json is invalid: .*parse JSON"),
    ({"regex": "(ab"}, "regex is invalid: .*parenthesis"),
    ({"grammar": "root ::= foo"}, 'grammar is invalid: .*Rule "foo" is not defined'),
])
def test_bad_specs_are_value_errors_naming_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        check(StructuredOutputsParams(**kw))


def test_sampling_params_reject_ignore_eos_and_unknown_fields():
    with pytest.raises(ValueError, match="ignore_eos cannot be used with structured_outputs"):
        SamplingParams(ignore_eos=True, structured_outputs={"regex": "a"})
    with pytest.raises(ValueError, match="unknown field"):
        SamplingParams(structured_outputs={"jsonschema": {}})


def test_every_output_matches_its_constraint_in_one_mixed_batch(llm):
    kinds = [({"json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
             ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
             ({"choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so") or pytest.fail(t)),
             ({"grammar": EBNF}, lambda t: re.fullmatch(EBNF_RE, t) or pytest.fail(t))]  # all finite languages
    params, checks = [], []
    for i in range(30):
        spec, chk = kinds[i % len(kinds)]
        sampling = {"temperature": 0} if i % 2 else {"temperature": 1.0, "seed": i}
        params.append(SamplingParams(max_tokens=600, structured_outputs=spec, **sampling))
        checks.append(chk)
    prompts = [{"prompt_token_ids": [100 + i, 7, 300 + i]} for i in range(30)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for o, chk in zip(outs, checks):
        c = o.outputs[0]
        assert c.finish_reason == "stop", (c.finish_reason, c.text)
        chk(c.text)
    kv = llm.engine.core.scheduler.kv
    assert kv.num_free_blocks == llm.engine.core.cache_config.num_blocks


def test_unconstrained_rows_are_unchanged_by_constrained_neighbours(llm):
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": [50 + i, 60 + i]} for i in range(4)]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    mixed = llm.generate(prompts + prompts, [plain] * 4 + [SamplingParams(max_tokens=40, temperature=0,
                                                                          structured_outputs={"regex": REGEX})] * 4,
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == alone


def test_the_batch_never_waits_for_a_slow_grammar(llm, monkeypatch):
    gate = threading.Event()
    original = GrammarCompilerPool._compile

    def slow(self, p):
        assert gate.wait(30), "the test never released the compilation"
        return original(self, p)

    monkeypatch.setattr(GrammarCompilerPool, "_compile", slow)
    core = llm.engine.core
    engine = llm.engine
    engine.add_request("slow", None, [5, 6, 7],
                       SamplingParams(max_tokens=20, temperature=0, structured_outputs={"regex": "x[a-c]{3}"}))
    engine.add_request("plain", None, [8, 9], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    finished = {}
    for _ in range(200):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if "plain" in finished:
            break
    assert "plain" in finished and "slow" not in finished
    assert "slow" in core.structured.waiting  # still compiling: never in the scheduler
    gate.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert re.fullmatch("x[a-c]{3}", finished["slow"].outputs[0].text)


def test_a_grammar_that_fails_to_compile_fails_its_request_alone(llm, monkeypatch):
    def broken(self, p):
        raise ValueError("structured_outputs.regex could not be compiled: boom")

    monkeypatch.setattr(GrammarCompilerPool, "_compile", broken)
    monkeypatch.setattr(GrammarCompilerPool, "submit", lambda self, p: self._pool.submit(self._compile, p))
    outs = llm.generate([{"prompt_token_ids": [5, 6]}] * 2,
                        [SamplingParams(max_tokens=5, structured_outputs={"regex": "zz[a-c]"}),
                         SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and "boom" in outs[0].error
    assert len(outs[1].outputs[0].token_ids) == 5


def test_same_grammar_compiles_once(llm):
    pool = llm.engine.core.structured.pool
    before = pool.num_compiled
    spec = {"regex": "q[0-9]{2}"}
    llm.generate([{"prompt_token_ids": [11, 12]}] * 3, SamplingParams(max_tokens=8, structured_outputs=spec),
                 use_tqdm=False)
    assert pool.num_compiled == before + 1 and pool.num_cache_hits >= 2


@pytest.mark.parametrize("method", [{"method": "draft_model", "num_speculative_tokens": 3},
                                    {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                     "prompt_lookup_max": 3}])
def test_speculation_under_a_grammar_changes_nothing(tiny_model_dir, llm, method):
    """Drafts are verified against the grammar's state after each of them (one bitmask row per
    position): greedy output with speculation equals the output without, and drafts the grammar
    refuses are rejected, never emitted."""
    if method["method"] == "draft_model":
        method = {**method, "model": str(tiny_model_dir)}  # the draft ignores the grammar: it proposes refused tokens
    spec_llm = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=256, speculative_config=method)
    specs = [{"json": SCHEMA}, {"regex": REGEX}, {"grammar": EBNF}]
    params = [SamplingParams(max_tokens=300, temperature=0, structured_outputs=s) for s in specs]
    prompts = [{"prompt_token_ids": [100 + i, 7, 100 + i, 7]} for i in range(3)]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in spec_llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    stats = spec_llm.engine.core.scheduler.stats()
    assert stats.spec_num_draft_tokens > 0  # it did speculate
    if method["method"] == "ngram":  # some drafts fit the grammar and were accepted (ngram: 13 of 68)
        assert stats.spec_num_accepted_tokens > 0


def test_json_object_starts_an_object(llm):
    """Any JSON object is unbounded (a random model never closes it): check the first tokens."""
    outs = llm.generate([{"prompt_token_ids": [40 + i, 41]} for i in range(4)],
                        SamplingParams(max_tokens=6, temperature=1.0, seed=3, structured_outputs={"json_object": True}),
                        use_tqdm=False)
    assert all(o.outputs[0].text.lstrip().startswith("{") for o in outs)
