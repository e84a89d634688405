"""``min_tokens`` with every token banned (all are stop or EOS ids): an error for that request,
never a made-up token 0."""

from __future__ import annotations

import pytest
import torch

from fleetlm import LLM, SamplingParams
from fleetlm.sample.sampler import NoTokenAllowedError, Sampler, SamplingMetadata

V = 16


def metadata(banned: list[tuple[int, int]], greedy: bool) -> SamplingMetadata:
    rows, cols = zip(*banned)
    temp = torch.zeros(2) if greedy else torch.ones(2)
    return SamplingMetadata(temperature=temp, all_greedy=greedy, banned_rows=torch.tensor(rows),
                            banned_cols=torch.tensor(cols))


@pytest.mark.parametrize("greedy", [True, False])
def test_sampler_refuses_a_row_with_every_token_banned(greedy):
    logits = torch.randn(2, V)
    every = [(1, t) for t in range(V)]
    with pytest.raises(NoTokenAllowedError, match="min_tokens"):
        Sampler()(logits, metadata([(0, 3)] + every, greedy))
    out = Sampler()(logits, metadata([(0, 3), (1, 3)] + [(1, t) for t in range(1, V)], greedy))
    assert out.sampled[1].item() == 0  # one token left: that one


def test_engine_fails_only_the_request_that_bans_everything(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=64)
    vocab = llm.engine.model_config.vocab_size
    ok = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    impossible = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=range(vocab))
    prompts = [{"prompt_token_ids": [100 + i, 200 + i, 300 + i]} for i in range(3)]
    clean = [o.outputs[0].token_ids for o in llm.generate(prompts, ok, use_tqdm=False)]
    outs = llm.generate(prompts, [ok, impossible, ok], use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "error" and "min_tokens" in outs[1].error
    assert outs[1].outputs[0].token_ids == []  # no token 0 (or any token) was emitted
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == [clean[0], clean[2]]
