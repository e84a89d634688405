"""Offline ``LLM.generate`` with ``priority=[...]`` and per-prompt ``cache_salt`` (issue 15, as
vLLM accepts them), on a tiny random model: priorities order admission, salts split the prefix
cache, and bad values are ``ValueError``s naming them."""

from __future__ import annotations

import pytest

from fleetlm import LLM
from fleetlm.sampling_params import SamplingParams

IDS = [(7 * i + 3) % 900 + 10 for i in range(70)]  # 4 full blocks of 16


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), dtype="float32", max_num_seqs=1, kv_cache_memory=16 << 20)


def greedy(n: int = 2) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0)


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_priority_orders_admission_and_ties_stay_in_order(llm, tiny_model_dir, policy):
    if policy != "fcfs":
        llm = LLM(str(tiny_model_dir), dtype="float32", max_num_seqs=1, kv_cache_memory=16 << 20,
                  scheduling_policy=policy)
    prompts = [{"prompt_token_ids": [10 + i] * 5} for i in range(5)]
    outs = llm.generate(prompts, greedy(), use_tqdm=False, priority=[3, 0, -1, 0, 2])
    order = sorted(range(5), key=lambda i: outs[i].metrics.first_scheduled_time)
    assert order == [2, 1, 3, 4, 0]  # lower first; the two 0s in the order given
    plain = llm.generate(prompts, greedy(), use_tqdm=False)
    assert sorted(range(5), key=lambda i: plain[i].metrics.first_scheduled_time) == [0, 1, 2, 3, 4]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]


def test_cache_salts_never_share_prefix_hits_and_the_same_salt_does(llm):
    def cached(prompt) -> int:
        return llm.generate([prompt], greedy(1), use_tqdm=False)[0].num_cached_tokens

    assert cached({"prompt_token_ids": IDS, "cache_salt": "alice"}) == 0
    assert cached({"prompt_token_ids": IDS, "cache_salt": "alice"}) == 64  # the same salt hits
    assert cached({"prompt_token_ids": IDS, "cache_salt": "bob"}) == 0  # another salt: cold
    assert cached({"prompt_token_ids": IDS}) == 0  # no salt: cold as well
    assert cached({"prompt_token_ids": IDS}) == 64
    assert cached({"prompt_token_ids": IDS, "cache_salt": "bob"}) == 64
    text = llm.get_tokenizer().decode(IDS)
    assert cached({"prompt": text, "cache_salt": "carol"}) == 0  # a text prompt takes a salt too
    assert cached({"prompt": text, "cache_salt": "carol"}) > 0


def test_salted_outputs_equal_unsalted_ones(llm):
    a, b = llm.generate([{"prompt_token_ids": IDS, "cache_salt": "x"}, {"prompt_token_ids": IDS}], greedy(6),
                        use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.parametrize("kwargs,match", [
    ({"priority": [0]}, "got 1 priorities for 2 prompts"),
    ({"priority": [0, 1.5]}, "priority must be integers, got 1.5"),
    ({"priority": [0, True]}, "priority must be integers, got True"),
    ({"priority": 3}, "priority must be a list of integers"),
])
def test_bad_priority_is_a_value_error_naming_it(llm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([{"prompt_token_ids": [5]}, {"prompt_token_ids": [6]}], greedy(), use_tqdm=False, **kwargs)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("salt", ["", 7, None])
def test_bad_cache_salt_is_a_value_error_naming_it(llm, salt):
    with pytest.raises(ValueError, match=f"cache_salt must be a non-empty string, got {salt!r}"):
        llm.generate([{"prompt_token_ids": [5]}, {"prompt_token_ids": [6], "cache_salt": salt}], greedy(),
                     use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
