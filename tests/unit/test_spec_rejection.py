"""Rejection sampling on a synthetic vocabulary: the emitted tokens follow the target's
distribution whatever the draft (chi-square at a fixed seed), and a biased verifier fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetlm.sample.sampler import Sampler, SamplingMetadata
from fleetlm.spec_decode.verify import accept_prefix, rejection_sample

V, N = 8, 20000
ALPHA = 1e-3  # a correct sampler fails this about once in a thousand seeds; the seed is fixed


def _target_logits(seed: int) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 1.5


def _draft_probs(seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 2.0, -1)


def _meta(rows: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> SamplingMetadata:
    m = SamplingMetadata(temperature=torch.full((rows,), temperature), all_greedy=False)
    if top_k:
        m.top_k = torch.full((rows,), top_k, dtype=torch.long)
    if top_p < 1.0:
        m.top_p = torch.full((rows,), top_p)
    return m


def _expected(logits: torch.Tensor, temperature: float, top_k: int) -> np.ndarray:
    z = logits / temperature
    if top_k:
        z = z.masked_fill(z < z.topk(top_k).values[-1], float("-inf"))
    return torch.softmax(z, -1).numpy()


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square test: the p-value of ``counts`` under ``probs``."""
    probs = np.asarray(probs, dtype=np.float64)
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token outside the target's support was emitted"
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _verify_first_token(logits: torch.Tensor, drafts: np.ndarray, m: SamplingMetadata, seed: int) -> np.ndarray:
    """The engine's verifier with one draft per trial: row 0 is the draft's position, row 1 the
    bonus position; returns the first emitted token of each trial."""
    torch.manual_seed(seed)
    rows = logits.expand(2 * N, V).contiguous()
    sampled = Sampler()(rows, m).sampled.view(N, 2).tolist()
    return np.array([accept_prefix([int(d)], s)[0] for d, s in zip(drafts, sampled)])


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_point_mass_verifier_keeps_the_target_distribution(temperature, top_k):
    logits = _target_logits(1)
    q = _draft_probs(2)  # drafts drawn from a distribution far from the target
    drafts = torch.multinomial(q, N, replacement=True, generator=torch.Generator().manual_seed(3)).numpy()
    first = _verify_first_token(logits, drafts, _meta(2 * N, temperature, top_k), seed=4)
    counts = np.bincount(first, minlength=V)
    assert _chi2(counts, _expected(logits, temperature, top_k)) > ALPHA
    # acceptance is p(d): the fraction of trials that emitted their draft matches sum_d q(d) p(d)
    p = _expected(logits, temperature, top_k)
    rate = (first == drafts).mean()
    assert abs(rate - float((q.numpy() * p).sum())) < 0.02


def test_a_biased_verifier_fails_the_same_test():
    """Power check: accepting every draft (the classic bug) is caught by this sample size."""
    logits = _target_logits(1)
    drafts = torch.multinomial(_draft_probs(2), N, replacement=True, generator=torch.Generator().manual_seed(3))
    counts = np.bincount(drafts.numpy(), minlength=V)
    assert _chi2(counts, _expected(logits, 1.0, 0)) < ALPHA


def test_second_token_follows_the_target_given_the_first():
    """Two positions: the target at position 2 depends on the token at position 1 (a synthetic
    table); the joint distribution of (token 1, token 2) must be the target's."""
    p1 = torch.softmax(_target_logits(5), -1)
    table = torch.softmax(torch.randn(V, V, generator=torch.Generator().manual_seed(6)) * 1.5, -1)
    g = torch.Generator().manual_seed(7)
    d1 = torch.multinomial(_draft_probs(8), N, replacement=True, generator=g).tolist()
    d2 = torch.multinomial(_draft_probs(9), N, replacement=True, generator=g).tolist()
    pairs = np.zeros((V, V), dtype=np.int64)
    for a, b in zip(d1, d2):
        s1 = int(torch.multinomial(p1, 1, generator=g))
        if s1 != a:  # rejected at position 1: position 2 is sampled in a later step
            s2 = int(torch.multinomial(table[s1], 1, generator=g))
            pairs[s1, s2] += 1
            continue
        s2 = int(torch.multinomial(table[a], 1, generator=g))  # row 2 sees draft 1 as emitted
        out = accept_prefix([a, b], [s1, s2, 0])
        pairs[out[0], out[1]] += 1
    joint = (p1[:, None] * table).numpy().ravel()
    assert _chi2(pairs.ravel(), joint) > ALPHA


def test_general_rejection_sampler_keeps_the_target_distribution():
    """Leviathan's rule for a draft that samples: accept with min(1, p/q), else the residual."""
    p = torch.softmax(_target_logits(10), -1)
    q = _draft_probs(11)
    g = torch.Generator().manual_seed(12)
    firsts, accepted = [], 0
    for _ in range(N):
        d = int(torch.multinomial(q, 1, generator=g))
        out = rejection_sample(torch.stack([p, p]), q[None], [d], generator=g)
        firsts.append(out[0])
        accepted += len(out) == 2
    assert _chi2(np.bincount(firsts, minlength=V), p.numpy()) > ALPHA
    expect = float(torch.minimum(p, q).sum())  # acceptance rate of rejection sampling
    assert abs(accepted / N - expect) < 0.02


def test_accept_prefix():
    assert accept_prefix([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accept_prefix([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accept_prefix([5, 6, 7], [1, 6, 7, 8]) == [1]
    assert accept_prefix([], [4]) == [4]
    assert accept_prefix([5, 6, 7], [5, 6, 7, 8], limit=1) == [5, 6]  # grammar allowed one draft
