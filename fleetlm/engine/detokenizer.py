"""Incremental detokenization and stop-string matching for one sequence.

Text is emitted only once it is stable: a token window is decoded with a little left context,
and nothing is emitted while the tail is an incomplete UTF-8 sequence (U+FFFD), so streaming
never shows broken characters and the concatenated pieces equal a full decode. The window
starts with the last few prompt tokens, so tokenizers that drop a word's leading space when it is
decoded alone (SentencePiece) still give the first output token its space.
"""

from __future__ import annotations

from fleetlm.engine.stop_matcher import automaton_for
from fleetlm.models.tokenizer import Tokenizer
from fleetlm.sampling_params import SamplingParams

PROMPT_CONTEXT = 5  # prompt tokens decoded as left context


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_ids: list[int] | tuple = ()) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:])  # context + decoded output
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = len(self.token_ids)
        self._stops = automaton_for(params.stop) if params.stop else None
        self._stop_state = 0  # the automaton's state after the first ``_stop_fed`` characters of text
        self._stop_fed = 0
        self.stop_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def add_tokens(self, new_ids: list[int]) -> str:
        """Append tokens; return the newly stable text (may be empty)."""
        self.token_ids.extend(new_ids)
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of the sequence: whatever is left, even if it is an incomplete character."""
        rest = self._decode(self.token_ids[self._prefix_offset :])
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        delta = rest[len(prefix) :] if rest.startswith(prefix) else ""
        self._prefix_offset = self._read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def check_stop(self, num_new_chars: int) -> bool:
        """Look for a stop string ending in the last ``num_new_chars`` characters (it may start
        earlier); on a match, truncate the text (keeping the stop string only if asked) and
        remember which one. Each character goes through the stop automaton once, so the cost does
        not grow with the number of stop strings (see ``stop_matcher``)."""
        if self._stops is None or not num_new_chars:
            return False
        new_start = max(len(self.text) - num_new_chars, self._stop_fed)
        state = self._stops.skip(self._stop_state, self.text[self._stop_fed : new_start])  # not checked (min_tokens)
        state, end, stop = self._stops.feed(state, self.text[new_start:])
        self._stop_state, self._stop_fed = state, len(self.text)
        if stop is None:
            return False
        end += new_start
        self.text = self.text[:end] if self.params.include_stop_str_in_output else self.text[: end - len(stop)]
        self.stop_reason = stop
        return True
