"""Tree drafting for ``medusa`` and ``eagle`` (``tree.py`` defines the tree).

Node ``i`` of the static tree takes the ``paths[i][-1]``-th best token of the proposer's guess
at its parent. Medusa's guess at depth d is head ``d - 1``'s on the last verified hidden state,
the same for every parent (Medusa's sparse trees). EAGLE's guess below a node depends on the
node: the head runs once per depth over all the nodes drafted so far (the root's children come
from the chain's first pass), each node at head position ``L - 1 + depth`` (L: the position of
the last emitted token) with its parent's output as feature, its K/V at temporary slots
``L + node`` of the head's own cache and a tree mask (ancestors and itself past the cached
context). Re-running the shallower nodes at each depth keeps one mask shape; at the default 8-10
nodes and one layer that is a few small forwards. A request's tree is cut to the depth it may
draft (``num_drafts``) and to the head slots its blocks hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fleetlm.attention.base import BatchLayout, ForwardContext, forward_context
from fleetlm.spec_decode.paged import Run
from fleetlm.spec_decode.proposer import ProposeBatch, ProposeItem
from fleetlm.spec_decode.tree import DraftTree


@dataclass
class TreeProposeBatch(ProposeBatch):
    """A ``ProposeBatch`` whose requests in ``tree_ids`` want a tree (the others a chain)."""

    tree_ids: frozenset[str] = field(default_factory=frozenset)


def tree_ids(batch: ProposeBatch) -> frozenset[str]:
    return getattr(batch, "tree_ids", frozenset())


def split(batch: ProposeBatch, items: list[ProposeItem]) -> tuple[list[ProposeItem], list[ProposeItem]]:
    """(chain items, tree items)."""
    ids = tree_ids(batch)
    return [it for it in items if it.req_id not in ids], [it for it in items if it.req_id in ids]


def medusa_tree(proposer, batch: ProposeBatch, items: list[ProposeItem], tree: DraftTree) -> dict[str, list[int]]:
    rows = torch.stack([it.hidden_rows[-1] for it in items])
    h = batch.hidden.index_select(0, rows)
    depth = min(tree.depth, max(it.num_drafts for it in items))
    tops = [proposer._logits(j, h).topk(tree.ranks_at(j + 1), dim=-1).indices.tolist() for j in range(depth)]
    out = {}
    for i, it in enumerate(items):
        n = tree.num_nodes(it.num_drafts)
        out[it.req_id] = [tops[len(p) - 1][i][p[-1]] for p in tree.paths[:n]]
    return out


@dataclass
class _Grow:
    """One request's tree being drafted by the EAGLE head."""

    run: Run  # its first pass
    max_depth: int
    nodes: list[int] = field(default_factory=list)  # tokens of the nodes drafted so far

    @property
    def base(self) -> int:  # L: the head position of the depth-1 nodes, and the first temporary slot
        return self.run.start + len(self.run.tokens)


def _fits(run: Run, tree: DraftTree, depth: int, block_size: int) -> int:
    """The deepest tree (<= depth) whose head slots lie in the request's blocks."""
    base = run.start + len(run.tokens)
    while depth > 1 and base + tree.num_nodes(depth - 1) > len(run.block_ids) * block_size:
        depth -= 1
    return depth


def eagle_tree(proposer, items: list[ProposeItem], first: list[Run], first_feats: list[torch.Tensor],
               tree: DraftTree) -> dict[str, list[int]]:
    """Trees for ``items`` (their first passes ``first`` over features ``first_feats``)."""
    logits, feats = proposer._step(first, first_feats)
    grows = [_Grow(r, _fits(r, tree, min(it.num_drafts, tree.depth), proposer.runner.block_size))
             for it, r in zip(items, first)]
    top = logits.topk(tree.ranks_at(1), dim=-1).indices.tolist()
    for g, t in zip(grows, top):
        g.nodes = [t[p[0]] for p in tree.paths[: tree.num_nodes(1)]]
    node_feats = [feats[i : i + 1] for i in range(len(grows))]  # the root's output, per request
    for d in range(1, tree.depth):
        live = [i for i, g in enumerate(grows) if g.max_depth > d]
        if not live:
            break
        parents = sorted({tree.parents[j] for j in range(tree.num_nodes(d), tree.num_nodes(d + 1))})
        outs = _head_pass(proposer, tree, [grows[i] for i in live], [node_feats[i] for i in live])
        # the LM head only on the nodes that get children at depth d + 1
        rows = torch.tensor(parents, device=outs[0].device)
        logits = proposer.runner.model.compute_logits(torch.cat([ft.index_select(0, rows) for ft in outs]))
        picks = logits.topk(tree.ranks_at(d + 1), dim=-1).indices.tolist()
        for r, (i, ft) in enumerate(zip(live, outs)):
            g, at = grows[i], {p: r * len(parents) + x for x, p in enumerate(parents)}
            for j in range(len(g.nodes), tree.num_nodes(d + 1)):  # the children of this depth's nodes
                g.nodes.append(picks[at[tree.parents[j]]][tree.paths[j][-1]])
            node_feats[i] = torch.cat([feats[i : i + 1], ft])
    return {it.req_id: g.nodes for it, g in zip(items, grows)}


def _head_pass(proposer, tree: DraftTree, grows: list[_Grow], feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """The head over every node drafted so far of each request (tree mask, depth positions).
    ``feats[i]`` holds the root's output then each node's; a node's input feature is its
    parent's output. Returns per request the head's (normed) outputs of its nodes."""
    runner, model = proposer.runner, proposer.runner.model
    bs = runner.block_size
    order = sorted(range(len(grows)), key=lambda i: len(grows[i].nodes) != 1)
    q = np.array([len(grows[i].nodes) for i in order], dtype=np.int64)
    ctx = np.array([grows[i].base for i in order], dtype=np.int64)
    table = np.zeros((len(order), max(len(grows[i].run.block_ids) for i in order)), dtype=np.int64)
    tokens, positions, slots, masks, inputs = [], [], [], [], []
    for r, i in enumerate(order):
        g = grows[i]
        n = len(g.nodes)
        table[r, : len(g.run.block_ids)] = g.run.block_ids
        tokens += g.nodes
        positions.append(g.base - 1 + tree.depths[:n])
        slot_pos = g.base + np.arange(n)
        slots.append(table[r, slot_pos // bs] * bs + slot_pos % bs)
        masks.append(tree.ancestor_matrix(n)[1:, 1:])
        inputs.append(feats[i][[tree.parents[j] + 1 for j in range(n)]])
    layout = BatchLayout(q, ctx, table, torch.from_numpy(np.concatenate(slots)), int((q == 1).sum()),
                         tree_masks=tuple(masks))
    dev = runner.device
    meta = runner.backend.build_metadata(layout, dev)
    ids = torch.tensor(tokens, device=dev)
    pos = torch.from_numpy(np.concatenate(positions)).to(dev)
    with forward_context(ForwardContext(runner.backend, meta, proposer.kv_caches)):
        out = model.model.norm(proposer.head(torch.cat(inputs), model.model.embed_tokens(ids), pos))
    ends = np.cumsum(q)
    res = [None] * len(grows)
    for r, i in enumerate(order):
        res[i] = out[ends[r] - q[r] : ends[r]]
    return res
