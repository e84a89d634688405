"""Verification of draft tokens: exact rejection sampling (Leviathan et al. 2023, Chen et al. 2023).

The engine's proposers draft their argmax, a point-mass draft distribution ``q = 1[x = d]``. For
that ``q`` the rejection rule is: accept ``d`` with probability ``min(1, p(d) / q(d)) = p(d)``; on
rejection, draw from ``norm(max(p - q, 0))`` = ``p`` without ``d``, renormalised. Drawing one
token ``x ~ p`` and accepting iff ``x == d`` (emitting ``x`` otherwise) does exactly that:
``P(accept) = p(d)`` and ``x | x != d`` is ``p`` without ``d``. So the engine samples each of the
``k + 1`` positions from the target with the regular sampler (every setting: penalties, min-tokens,
temperature, top-k/top-p/min-p, and the seeded draw of output position ``i`` from
``(seed, i)``), positions after a draft see that draft as already emitted, and the emitted tokens
are the longest prefix of samples that equals the drafts, plus the first sample that does not (or
the bonus sample after ``k`` accepted drafts). Greedy rows are exact match. Every emitted token is
a target sample given the tokens before it, so the output distribution is the target's, and
seeded and greedy requests emit the same tokens with or without speculation.

``rejection_sample`` is the general rule for a draft distribution that is not a point mass
(a proposer that samples its drafts); it is tested on synthetic distributions.
"""

from __future__ import annotations

import torch


def accept_prefix(drafts: list[int], samples: list[int], limit: int | None = None) -> list[int]:
    """Tokens to emit: ``samples[j]`` for each position while the drafts match, ending with the
    first mismatching sample or the bonus sample. ``samples`` has ``len(drafts) + 1`` entries;
    only the first ``limit`` drafts may be accepted."""
    n = len(drafts) if limit is None else min(limit, len(drafts))
    out: list[int] = []
    for j in range(n):
        out.append(samples[j])
        if samples[j] != drafts[j]:
            return out
    out.append(samples[n])
    return out


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_ids: list[int],
                     generator: torch.Generator | None = None) -> list[int]:
    """General rejection sampling for one request: ``target_probs [k+1, V]`` (row j: the target
    after the first j drafts), ``draft_probs [k, V]`` (the draft's distribution each draft was
    drawn from), ``draft_ids [k]``. Returns the accepted drafts and one more token."""
    out: list[int] = []
    for j, d in enumerate(draft_ids):
        p, q = target_probs[j], draft_probs[j]
        u = torch.rand((), generator=generator, device=p.device)
        if q[d] > 0 and u * q[d] <= p[d]:
            out.append(d)
            continue
        residual = (p - q).clamp_min(0)
        total = residual.sum()
        residual = residual / total if total > 0 else p
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(target_probs[len(draft_ids)], 1, generator=generator)))
    return out
