"""An approximate prefix index: one radix tree per replica of the prompts routed to it.

The router does not see a replica's KV cache, only what it sent there; the tree is its guess of
what the replica still holds. Keys are any sliceable sequence (prompt text for the HTTP router,
token-id tuples for the data-parallel front end). Each tree is bounded: past ``max_size``
elements the least recently routed leaves are dropped, as the replica's LRU would drop them.

Invariant: ``size`` equals the summed edge lengths of the tree, and every non-root node has a
non-empty edge whose first element is its key in the parent's ``children``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

_clock = itertools.count()


class _Node:
    __slots__ = ("edge", "children", "parent", "stamp")

    def __init__(self, edge: Sequence, parent: _Node | None) -> None:
        self.edge = edge
        self.children: dict = {}
        self.parent = parent
        self.stamp = next(_clock)


def _common(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first difference: slices compare in C
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RadixTree:
    def __init__(self, max_size: int = 1 << 22) -> None:
        self.root = _Node((), None)
        self.size = 0
        self.max_size = max_size

    def match(self, key: Sequence) -> int:
        """Length of the longest prefix of ``key`` in the tree."""
        node, i = self.root, 0
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                return i
            n = _common(child.edge, key[i:i + len(child.edge)])
            i += n
            if n < len(child.edge):
                return i
            node = child
        return i

    def insert(self, key: Sequence) -> None:
        """Add ``key`` (marking its path as just used), then evict down to ``max_size``."""
        node, i, stamp = self.root, 0, next(_clock)
        node.stamp = stamp
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                leaf = _Node(key[i:], node)
                leaf.stamp = stamp
                node.children[key[i]] = leaf
                self.size += len(leaf.edge)
                break
            n = _common(child.edge, key[i:i + len(child.edge)])
            if n < len(child.edge):
                child = self._split(child, n)
            child.stamp = stamp
            node, i = child, i + n
        if self.size > self.max_size:
            self.evict(self.size - self.max_size * 9 // 10)

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut ``child``'s edge after ``n`` elements; returns the new upper node."""
        parent = child.parent
        upper = _Node(child.edge[:n], parent)
        upper.stamp = child.stamp
        parent.children[child.edge[0]] = upper
        child.edge = child.edge[n:]
        child.parent = upper
        upper.children[child.edge[0]] = child
        return upper

    def evict(self, amount: int) -> None:
        """Drop least recently used leaves until ``amount`` elements are gone (or the tree is empty)."""
        while amount > 0 and self.root.children:
            leaves = sorted(self._leaves(), key=lambda n: n.stamp)
            for leaf in leaves:
                if amount <= 0:
                    break
                amount -= len(leaf.edge)
                self._remove_leaf(leaf)

    def _remove_leaf(self, leaf: _Node) -> None:
        parent = leaf.parent
        del parent.children[leaf.edge[0]]
        self.size -= len(leaf.edge)
        if parent is not self.root and not parent.children:
            pass  # it becomes a leaf itself; a later round may take it
        elif parent is not self.root and len(parent.children) == 1:
            (only,) = parent.children.values()  # merge the parent with its only child
            parent.edge = parent.edge + only.edge
            parent.children = only.children
            parent.stamp = max(parent.stamp, only.stamp)
            for c in parent.children.values():
                c.parent = parent

    def _leaves(self) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            elif n is not self.root:
                out.append(n)
        return out
