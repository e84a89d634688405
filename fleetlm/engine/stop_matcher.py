"""Stop-string matching whose cost per character does not depend on how many stop strings a
request has: an Aho-Corasick automaton over the stop strings.

A sequence keeps one integer (its state) and feeds each new character once; a step follows at
most one edge forward plus failure links, which are paid for by earlier forward steps, so
feeding ``k`` characters costs O(k) whatever the number of stop strings. The automaton is
immutable and built once per distinct stop list (the ``n`` samples of a request share it).

Match rule: the stop string that ends first in the text; among those ending at the same
character, the longest (the one that starts first). The answer does not depend on how the text
was split into pieces, so streaming and non-streaming requests stop at the same place.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

_CHARS = 0x110000  # edge key = state * _CHARS + code point: one flat dict, no dict per node


class StopAutomaton:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self._edges: dict[int, int] = {}
        self._fail: list[int] = [0]
        self._match: list[str | None] = [None]  # longest stop string that ends at this state
        self._children: list[list[int]] = [[]]
        for s in stops:
            self._insert(s)
        self._link()
        del self._children  # only needed to build

    @property
    def num_states(self) -> int:
        return len(self._fail)

    def _insert(self, s: str) -> None:
        state = 0
        for ch in s:
            key = state * _CHARS + ord(ch)
            nxt = self._edges.get(key)
            if nxt is None:
                nxt = len(self._fail)
                self._edges[key] = nxt
                self._fail.append(0)
                self._match.append(None)
                self._children.append([])
                self._children[state].append(ord(ch))
            state = nxt
        self._match[state] = s  # a state spells exactly one string: its own match is the longest

    def _link(self) -> None:
        """Failure links, breadth first: the longest proper suffix of a state that is a state."""
        queue = deque(self._edges[c] for c in self._children[0])
        while queue:
            u = queue.popleft()
            for c in self._children[u]:
                v = self._edges[u * _CHARS + c]
                f = self._fail[u]
                while f and (f * _CHARS + c) not in self._edges:
                    f = self._fail[f]
                self._fail[v] = self._edges.get(f * _CHARS + c, 0)
                if self._match[v] is None:
                    self._match[v] = self._match[self._fail[v]]
                queue.append(v)

    def step(self, state: int, ch: str) -> int:
        c = ord(ch)
        while True:
            nxt = self._edges.get(state * _CHARS + c)
            if nxt is not None:
                return nxt
            if state == 0:
                return 0
            state = self._fail[state]

    def skip(self, state: int, text: str) -> int:
        """Feed ``text`` without looking for matches (text that must not stop the sequence)."""
        for ch in text:
            state = self.step(state, ch)
        return state

    def feed(self, state: int, text: str) -> tuple[int, int, str | None]:
        """Feed ``text`` from ``state``. Returns (state after, index in ``text`` just past the
        first match, the stop string matched) or (state after all of it, -1, None)."""
        for i, ch in enumerate(text):
            state = self.step(state, ch)
            match = self._match[state]
            if match is not None:
                return state, i + 1, match
        return state, -1, None


@lru_cache(maxsize=16)
def automaton_for(stops: tuple[str, ...]) -> StopAutomaton:
    """The shared automaton of a stop list (built once, reused by every sample using it)."""
    return StopAutomaton(stops)
