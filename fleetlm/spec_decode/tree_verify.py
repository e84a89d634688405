"""The worker's side of tree verification (``tree.py``): the layout of a step holding tree
requests, and acceptance with the K/V move onto the accepted path's slots."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fleetlm.spec_decode.tree import copy_kv_slots, walk


def tree_layout(hook, states, layout, positions: np.ndarray):
    """A tree request's query is its root then its nodes at consecutive (temporary) slots; the
    nodes' RoPE positions become ``ctx + depth`` and its rows attend as the tree allows."""
    q, ctx = layout.query_lens, layout.context_lens
    starts = np.cumsum(q) - q
    masks: list[np.ndarray | None] = [None] * len(states)
    for i, s in enumerate(states):
        n = len(s.spec_token_ids)
        if not hook.is_tree(s) or int(q[i]) != n + 1:
            continue
        a = int(starts[i])
        positions[a + 1 : a + 1 + n] = ctx[i] + hook.tree.depths[:n]
        masks[i] = hook.tree.ancestor_matrix(n)
    if all(m is None for m in masks):
        return layout, positions
    return replace(layout, tree_masks=tuple(masks)), positions


def accept_tree(hook, state, samples: list[int]) -> tuple[list[int], list[int]]:
    """Emitted tokens and the verified rows they were sampled at (root first, relative to the
    request's first row). The accepted nodes' K/V move from their slots ``ctx + 1 + node`` to the
    path's ``ctx + 1 + j`` in every layer of the target's cache: the scheduler then keeps
    ``1 + accepted`` positions, which hold exactly the emitted path."""
    nodes = state.spec_token_ids
    emitted, path = walk(hook.tree, nodes, samples)
    runner = hook.runner
    ctx = state.num_computed_tokens - len(nodes) - 1  # the runner already advanced it past the step
    bs, blocks = runner.block_size, state.block_ids

    def slot(pos: int) -> int:
        return blocks[pos // bs] * bs + pos % bs

    moves = [(slot(ctx + 1 + p), slot(ctx + 1 + j)) for j, p in enumerate(path) if p != j]
    if moves:
        copy_kv_slots(runner.kv_cache, [m[0] for m in moves], [m[1] for m in moves])
    return emitted, [0] + [1 + p for p in path]
