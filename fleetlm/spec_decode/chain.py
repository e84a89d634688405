"""The draft loop shared by the proposers that run a small model autoregressively.

First pass: each item's first run (the valid positions of the step plus the token sampled last,
or whatever the proposer needs) in one batched forward; the logits of every run's last token give
the first draft. Then one batched single-token forward per further draft. Items with
``num_drafts == 0`` take part in the first pass only (their cache stays in step) and propose
nothing. A draft never writes past the last position its request may reach (the slots there
are allocated ahead by the scheduler, ``num_lookahead_tokens``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fleetlm.spec_decode.paged import Run
from fleetlm.spec_decode.proposer import ProposeItem

# (runs, state carried between passes or None) -> (logits of each run's last token, new state)
StepFn = Callable[[list[Run], object], tuple[torch.Tensor, object]]


def run_chain(items: list[ProposeItem], first: list[Run], step: StepFn) -> dict[str, list[int]]:
    """Drafts per request id, from ``first`` (one run per item, same order) then single tokens."""
    if not items:
        return {}
    logits, carry = step(first, None)
    want = [it.num_drafts if it.emitted else 0 for it in items]
    drafts: dict[int, list[int]] = {i: [t] for i, t in enumerate(logits.argmax(-1).tolist()) if want[i] > 0}
    live = [i for i in drafts if want[i] > 1]
    while live:
        runs = [Run([drafts[i][-1]], first[i].start + len(first[i].tokens) + len(drafts[i]) - 1, first[i].block_ids)
                for i in live]
        sub = carry_rows(carry, live)
        logits, carry_live = step(runs, sub)
        for j, t in zip(live, logits.argmax(-1).tolist()):
            drafts[j].append(t)
        carry = _scatter(carry, carry_live, live)
        live = [i for i in live if len(drafts[i]) < want[i]]
    return {items[i].req_id: d for i, d in drafts.items()}


def carry_rows(carry: object, idx: list[int]) -> object:
    if carry is None:
        return None
    return carry[torch.tensor(idx, device=carry.device)]


def _scatter(carry: object, new: object, idx: list[int]) -> object:
    if carry is None or new is None:
        return None
    carry = carry.clone()
    carry[torch.tensor(idx, device=carry.device)] = new
    return carry
