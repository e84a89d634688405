"""Top-k gating and the capacity rule.

Gating follows the model: softmax over all experts in fp32, top-k, and (``renormalize``) the k
weights divided by their sum (Mixtral always; Qwen when ``norm_topk_prob``).

Capacity (``capacity_factor`` f): each expert takes at most ``C = ceil(f * T * k / E)`` of a
step's ``T * k`` assignments. Assignments claim room in priority order: every token's first
choice (token order), then every token's second choice, and so on. An assignment that finds its
expert full *overflows*:

- ``drop``: it is removed (the token keeps its other experts; its weights are not renormalised).
- ``reroute``: overflowed assignments, in the same priority order, move to the token's next-best
  expert (router probability order) that the token does not already use and that still has room,
  keeping the slot's weight (the token's mixture keeps its mass: with identical experts, as after
  upcycling, the output is unchanged); one that finds no such expert is dropped.

``Routing.dropped`` and ``Routing.rerouted`` count assignments (not tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    ids: torch.Tensor  # [T, k] int64 expert ids; -1 = dropped
    weights: torch.Tensor  # [T, k] fp32 combine weights (0 where dropped)
    dropped: int = 0
    rerouted: int = 0


def topk_gate(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[Routing, torch.Tensor]:
    """(routing, fp32 probabilities [T, E])."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return Routing(ids, weights), probs


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def apply_capacity(routing: Routing, probs: torch.Tensor, factor: float, policy: str) -> Routing:
    """Enforce the capacity rule (module docstring) on ``routing``; returns a new ``Routing``."""
    t, k = routing.ids.shape
    e = probs.shape[1]
    cap = expert_capacity(t, k, e, factor)
    prio = routing.ids.t().reshape(-1)  # priority order: choice j, then token
    order = torch.argsort(prio, stable=True)
    counts = torch.bincount(prio, minlength=e)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(prio)
    pos[order] = torch.arange(prio.numel()) - starts[prio[order]]
    over = (pos >= cap).nonzero().flatten()
    ids, weights = routing.ids.clone(), routing.weights.clone()
    if over.numel() == 0:
        return Routing(ids, weights)
    tok, slot = (over % t), (over // t)
    ids[tok, slot] = -1
    weights[tok, slot] = 0.0
    if policy == "drop":
        return Routing(ids, weights, dropped=int(over.numel()))
    room = (cap - torch.clamp(counts, max=cap)).tolist()
    weights[tok, slot] = routing.weights[tok, slot]  # a rerouted slot keeps its weight
    return _reroute(ids, weights, routing.ids, probs, tok.tolist(), slot.tolist(), room)


def _reroute(ids: torch.Tensor, weights: torch.Tensor, original: torch.Tensor, probs: torch.Tensor,
             toks: list[int], slots: list[int], room: list[int]) -> Routing:
    ranked = torch.argsort(probs[toks], dim=-1, descending=True, stable=True).tolist()
    used = {tk: set(original[tk].tolist()) for tk in toks}
    dropped = rerouted = 0
    for tk, slot, prefs in zip(toks, slots, ranked):
        choice = next((x for x in prefs if room[x] > 0 and x not in used[tk]), None)
        if choice is None:
            weights[tk, slot] = 0.0
            dropped += 1
            continue
        room[choice] -= 1
        used[tk].add(choice)
        ids[tk, slot] = choice
        rerouted += 1
    return Routing(ids, weights, dropped=dropped, rerouted=rerouted)
