"""Stop checks whose cost does not grow with the number of stop strings or stop token ids."""

from __future__ import annotations

import random

import msgspec
import pytest

from fleetlm.engine.stop_matcher import StopAutomaton, automaton_for
from fleetlm.sampling_params import SamplingParams


def first_match(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Reference: (end index, stop) of the stop string ending first; the longest if tied."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return end, max(hits, key=len)
    return None


@pytest.mark.parametrize("seed", range(30))
def test_automaton_finds_what_brute_force_finds(seed):
    rng = random.Random(seed)
    alphabet = "abc" if seed % 2 else "ab\u00e9\U0001f600"
    stops = list({"".join(rng.choices(alphabet, k=rng.randint(1, 5))) for _ in range(rng.randint(1, 12))})
    text = "".join(rng.choices(alphabet, k=rng.randint(0, 60)))
    _, end, stop = StopAutomaton(tuple(stops)).feed(0, text)
    want = first_match(text, stops)
    assert (end, stop) == (want if want else (-1, None))


def test_feeding_in_pieces_equals_feeding_at_once():
    stops = ("abcab", "bca", "cc", "abd")
    text = "abcabdaccbcaab" * 3
    a = StopAutomaton(stops)
    whole = a.feed(0, text)
    state, offset = 0, 0
    for size in (1, 3, 2, 5, 1, 4, 100):
        state, end, stop = a.feed(state, text[offset : offset + size])
        if stop is not None:
            assert (offset + end, stop) == whole[1:]
            return
        offset += size
    pytest.fail("no match fed in pieces")


class CountingDict(dict):
    """Counts edge look-ups: the automaton's unit of work."""

    lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)


@pytest.mark.parametrize("num_stops", [1, 64, 1000])
def test_matching_work_per_character_does_not_grow_with_the_number_of_stops(num_stops):
    rng = random.Random(num_stops)
    stops = tuple({"".join(rng.choices("abcdefgh", k=rng.randint(4, 12))) + "#" for _ in range(num_stops)})
    a = StopAutomaton(stops)
    a._edges = CountingDict(a._edges)
    text = "".join(rng.choices("abcdefgh", k=20_000))  # never matches: no "#"
    assert a.feed(0, text)[2] is None
    # each character: one forward edge, plus failure hops paid for by earlier forward steps
    assert a._edges.lookups <= 2 * len(text)


def test_a_stop_list_is_compiled_once_and_shared():
    stops = ("x", "yz")
    assert automaton_for(stops) is automaton_for(("x", "yz"))


def test_detokenizer_stops_at_the_same_place_however_the_text_arrives():
    from fleetlm.engine.detokenizer import IncrementalDetokenizer

    class CharTokenizer:  # token id = code point: one character per token
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    text = "hello wonderful world, goodbye"
    params = SamplingParams(stop=["wonderful world", "der", "goodbye"] + [f"zz{i}" for i in range(60)])
    results = set()
    for step in (1, 2, 5, 30):
        d = IncrementalDetokenizer(CharTokenizer(), params)
        ids = [ord(c) for c in text]
        for i in range(0, len(ids), step):
            if d.check_stop(len(d.add_tokens(ids[i : i + step]))):
                break
        results.add((d.text, d.stop_reason))
    # "der" ends first, though "wonderful world" starts earlier (it used to win when both
    # arrived in one piece, and lose when they arrived one character at a time)
    assert results == {("hello won", "der")}


def test_stop_token_ids_are_a_set_and_survive_the_trip_to_the_engine_core():
    sp = SamplingParams(stop_token_ids=[7, 3, 7, 1000])
    assert sp.stop_token_ids == frozenset({3, 7, 1000})  # O(1) membership in the scheduler's stop check
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(sp), type=SamplingParams)
    assert back == sp and isinstance(back.stop_token_ids, frozenset)
    assert isinstance(sp.for_sample(1).stop_token_ids, frozenset)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[[1]])
