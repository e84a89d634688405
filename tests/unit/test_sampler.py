import math

import pytest
import torch

from fleetlm.sample.sampler import Sampler, apply_top_k_top_p
from fleetlm.sampling_params import SamplingParams
from fleetlm.worker.input_batch import CachedRequestState, build_sampling_metadata

V = 50


def state(sp: SamplingParams, out=(), prompt=(1, 2, 3), eos=0):
    return CachedRequestState("r", list(prompt), list(out), sp, [], 0, (eos,))


def sample(logits, states):
    m = build_sampling_metadata(states, logits.shape[1], torch.device("cpu"))
    return Sampler()(logits, m)


def rand_logits(b, seed=0):
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_top_k_1_equal_argmax():
    lg = rand_logits(4)
    greedy = sample(lg, [state(SamplingParams(temperature=0))] * 4).sampled
    top1 = sample(lg, [state(SamplingParams(temperature=1.3, top_k=1))] * 4).sampled
    assert torch.equal(greedy, lg.argmax(-1)) and torch.equal(top1, greedy)


def test_seed_reproducible_and_depends_on_position_not_batch():
    lg = rand_logits(1) / 6  # a flat distribution: draws differ
    sp = SamplingParams(temperature=1.0, seed=42)
    a = [sample(lg, [state(sp, out=[5] * k)]).sampled.item() for k in range(8)]
    b = [sample(torch.cat([rand_logits(1, 9), lg]), [state(SamplingParams(), out=[]), state(sp, out=[5] * k)]).sampled[1].item() for k in range(8)]
    assert a == b
    assert len(set(a)) > 1  # different positions draw differently


def test_sampling_follows_distribution():
    lg = torch.log(torch.tensor([[0.7, 0.2, 0.1] + [1e-9] * (V - 3)]))
    states = [state(SamplingParams(temperature=1.0, seed=i)) for i in range(2000)]
    counts = torch.bincount(sample(lg.expand(2000, V).clone(), states).sampled, minlength=V)
    assert abs(counts[0].item() / 2000 - 0.7) < 0.05 and abs(counts[2].item() / 2000 - 0.1) < 0.03


def test_top_p_and_min_p_cut_the_tail():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4)])
    lg = torch.log(probs + 1e-12)
    cut = apply_top_k_top_p(lg, None, torch.tensor([0.8]))
    assert torch.isfinite(cut[0, :2]).all() and torch.isinf(cut[0, 2:]).all()
    states = [state(SamplingParams(temperature=1.0, min_p=0.5, seed=i)) for i in range(300)]
    got = set(sample(lg.expand(300, V).clone(), states).sampled.tolist())
    assert got == {0, 1}  # 0.15 < 0.5 * 0.5


def test_penalties():
    lg = torch.zeros(1, V)
    lg[0, 7] = 2.0
    lg[0, 8] = 1.9
    # token 7 was generated twice: frequency penalty 0.1 * 2 drops it below token 8
    assert sample(lg.clone(), [state(SamplingParams(temperature=0, frequency_penalty=0.1), out=[7, 7])]).sampled.item() == 8
    assert sample(lg.clone(), [state(SamplingParams(temperature=0, presence_penalty=0.05), out=[7, 7])]).sampled.item() == 7
    assert sample(lg.clone(), [state(SamplingParams(temperature=0, presence_penalty=0.2), out=[7])]).sampled.item() == 8
    # repetition penalty divides positive logits of tokens seen in prompt or output
    assert sample(lg.clone(), [state(SamplingParams(temperature=0, repetition_penalty=1.2), prompt=[7])]).sampled.item() == 8
    assert sample(lg.clone(), [state(SamplingParams(temperature=0), prompt=[7])]).sampled.item() == 7


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    lg = torch.zeros(2, V)
    lg[:, 0] = 10.0  # eos
    lg[:, 3] = 9.0  # a stop token id
    sp = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    out = sample(lg, [state(sp, out=[]), state(sp, out=[9, 9])]).sampled.tolist()
    assert out[0] not in (0, 3) and out[1] == 0


def test_mixed_batch_rows_are_independent():
    lg = rand_logits(3)
    mixed = [state(SamplingParams(temperature=0)), state(SamplingParams(temperature=0.8, top_k=5, seed=3)),
             state(SamplingParams(temperature=0, presence_penalty=1.0), out=[int(lg[2].argmax())])]
    out = sample(lg.clone(), mixed).sampled
    assert out[0] == lg[0].argmax()
    assert out[1] == sample(lg[1:2].clone(), [mixed[1]]).sampled[0]
    assert out[1] in lg[1].topk(5).indices
    assert out[2] != lg[2].argmax()


def test_logprobs_are_raw_and_ranked():
    lg = rand_logits(2)
    r = sample(lg.clone(), [state(SamplingParams(temperature=0, logprobs=3))] * 2)
    lp = lg.log_softmax(-1)
    assert r.logprob_token_ids.shape == (2, 4)
    assert torch.allclose(r.logprobs[:, 1:], lp.topk(3).values)
    assert r.ranks.tolist() == [1, 1]
    assert math.isclose(r.logprobs[0, 0].item(), lp[0, r.sampled[0]].item(), rel_tol=1e-6)


@pytest.mark.parametrize("temp", [0.0, 0.7])
def test_all_settings_together_do_not_crash(temp):
    sp = SamplingParams(temperature=temp, top_k=10, top_p=0.9, min_p=0.05, presence_penalty=0.5,
                        frequency_penalty=0.5, repetition_penalty=1.1, seed=1, min_tokens=1, logprobs=2)
    r = sample(rand_logits(2), [state(sp, out=[1, 2]), state(sp)])
    assert r.sampled.shape == (2,)
