"""Tree verification: a small static candidate tree of drafts checked in one target forward.

The tree is a list of *paths*, each a tuple of ranks: ``(0, 1)`` is the node whose token is the
proposer's second choice (rank 1) below the node of its first choice (rank 0) at depth 1. Paths
are kept sorted by depth then lexicographically, so any prefix of the node list is itself a
tree (every parent comes before its children): the scheduler may cut a request's node list to
its token budget like a chain of drafts, and the worker knows the shape from the length alone.

In the target's forward the request's query is the root (its last known token, at position
``ctx``) followed by the nodes in that order, at the slots ``ctx + 1 + i`` (temporary), with the
RoPE position of each node its depth (``ctx + depth``) and a tree attention mask: a node sees
the cached context, the root, its ancestors and itself (``ancestor_matrix``).

Acceptance (``walk``): sample the target at every node as if the node's path had been emitted;
from the root, follow the child whose token equals the sample, emit every sample along the way
and stop at the first sample that no child carries. Drafts are deterministic (top-k of the
proposer), so each emitted token is a target sample given the tokens before it drawn with
its own randomness: exact for every sampling setting, and greedy is the longest path whose tokens
equal the target's argmax at each parent. The accepted nodes' K/V is then copied from their
temporary slots to the path's slots (``copy_kv_slots``) in every layer, so the scheduler's
rollback (``num_computed_tokens -= nodes - accepted``) leaves exactly the path in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

MAX_RANK = 16
MAX_NODES = 64


def default_tree(depth: int) -> tuple[tuple[int, ...], ...]:
    """Top-3 at depth 1; the top-2 below the best depth-1 node and the best below the second;
    below that, the top-2 under the top-1 chain at every further depth (8 nodes for depth 3,
    10 for depth 4)."""
    paths = [(0,), (1,), (2,)][: 3 if depth >= 1 else 0]
    if depth >= 2:
        paths += [(0, 0), (0, 1), (1, 0)]
    for d in range(3, depth + 1):
        paths += [(0,) * d, (0,) * (d - 1) + (1,)]
    return tuple(paths)


def parse_tree(raw, depth: int) -> tuple[tuple[int, ...], ...]:
    """Validate ``speculative_config.tree`` (a list of rank paths) against k = its depth."""
    if raw is None:
        return default_tree(depth)
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError(f"speculative_config.tree must be a non-empty list of paths (lists of ranks), got {raw!r}")
    paths = []
    for p in raw:
        if (not isinstance(p, (list, tuple)) or not p
                or any(not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < MAX_RANK for r in p)):
            raise ValueError(f"speculative_config.tree: path {p!r} must be a non-empty list of ranks in [0, {MAX_RANK})")
        paths.append(tuple(p))
    if len(set(paths)) != len(paths):
        raise ValueError("speculative_config.tree: a path is listed twice")
    if len(paths) > MAX_NODES:
        raise ValueError(f"speculative_config.tree: {len(paths)} nodes, at most {MAX_NODES}")
    have = set(paths)
    for p in paths:
        if len(p) > 1 and p[:-1] not in have:
            raise ValueError(f"speculative_config.tree: path {list(p)} lacks its parent {list(p[:-1])}")
    if max(len(p) for p in paths) != depth:
        raise ValueError(f"speculative_config.tree: its depth ({max(len(p) for p in paths)}) must equal "
                         f"num_speculative_tokens ({depth})")
    return tuple(sorted(paths, key=lambda p: (len(p), p)))


@dataclass(frozen=True)
class DraftTree:
    """The static tree; node ``i`` (0-based) is ``paths[i]``; index -1 is the root."""

    paths: tuple[tuple[int, ...], ...]

    @cached_property
    def parents(self) -> tuple[int, ...]:
        where = {p: i for i, p in enumerate(self.paths)}
        return tuple(where[p[:-1]] if len(p) > 1 else -1 for p in self.paths)

    @cached_property
    def depths(self) -> np.ndarray:
        return np.array([len(p) for p in self.paths], dtype=np.int64)

    @property
    def depth(self) -> int:
        return int(self.depths.max())

    def num_nodes(self, max_depth: int) -> int:
        """Nodes of depth <= max_depth (a prefix of the node list)."""
        return int((self.depths <= max_depth).sum())

    def depth_of(self, n: int) -> int:
        """Depth of the tree made of the first n nodes."""
        return int(self.depths[:n].max()) if n else 0

    def ranks_at(self, depth: int) -> int:
        """How many top candidates depth ``depth`` needs (1 + its largest rank)."""
        return 1 + max(p[-1] for p in self.paths if len(p) == depth)

    def ancestor_matrix(self, n: int) -> np.ndarray:
        """Bool [n+1, n+1] over (root, the first n nodes): row r may attend to column c iff c is
        r itself, the root or an ancestor of r."""
        m = np.zeros((n + 1, n + 1), dtype=bool)
        m[:, 0] = True
        for i in range(n):
            m[i + 1] = m[self.parents[i] + 1]
            m[i + 1, i + 1] = True
        return m

    def path_tokens(self, node_tokens: list[int], i: int) -> list[int]:
        """Tokens from depth 1 down to node ``i`` (empty for the root, ``i = -1``)."""
        out = []
        while i >= 0:
            out.append(node_tokens[i])
            i = self.parents[i]
        return out[::-1]


def walk(tree: DraftTree, node_tokens: list[int], samples: list[int]) -> tuple[list[int], list[int]]:
    """``samples[0]`` is the target's sample at the root, ``samples[1 + i]`` at node i. Returns the
    emitted tokens and the accepted nodes (indices, depth 1 first): ``len(emitted) = accepted + 1``."""
    n = len(node_tokens)
    children: dict[int, list[int]] = {}
    for i in range(n):
        children.setdefault(tree.parents[i], []).append(i)
    emitted, path, cur = [], [], -1
    while True:
        x = samples[cur + 1]
        emitted.append(x)
        nxt = next((c for c in children.get(cur, ()) if node_tokens[c] == x), None)
        if nxt is None:
            return emitted, path
        path.append(nxt)
        cur = nxt


def copy_kv_slots(kv_cache: torch.Tensor, src: list[int], dst: list[int]) -> None:
    """Copy K and V of flat slots ``src`` to ``dst`` in every layer of a cache shaped
    ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]`` (gathered first: ranges may overlap)."""
    if not src:
        return
    layers, two, nb, bs = kv_cache.shape[:4]
    flat = kv_cache.view(layers, two, nb * bs, *kv_cache.shape[4:])
    s = torch.tensor(src, device=kv_cache.device)
    d = torch.tensor(dst, device=kv_cache.device)
    flat.index_copy_(2, d, flat.index_select(2, s))


def uses_tree(config, sampling_params) -> bool:
    """Whether a request's drafts form the configured tree (else a chain): tree verification is
    on, and the request has no grammar (the grammar matcher walks drafts as a chain)."""
    return config.verification == "tree" and sampling_params.structured_outputs is None
