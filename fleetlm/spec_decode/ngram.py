"""Prompt lookup: find the request's last n tokens earlier in its own prompt and output (the
longest n in [prompt_lookup_min, prompt_lookup_max] that matches, the latest match), and propose
the tokens that followed it."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fleetlm.spec_decode.proposer import ProposeBatch, Proposer


def ngram_lookup(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix of
    ``tokens`` of length in ``[n_min, n_max]``; empty when none occurs."""
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = tokens[size - n:]
        windows = sliding_window_view(tokens[: size - 1], n)  # windows that end before the last token
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class NgramProposer(Proposer):
    def draft_cost(self) -> float:
        return 0.0

    def propose(self, batch: ProposeBatch) -> dict[str, list[int]]:
        c, out = self.config, {}
        for it in batch.items:
            if it.num_drafts > 0:
                drafts = ngram_lookup(np.asarray(it.token_ids, dtype=np.int64), c.prompt_lookup_min,
                                      c.prompt_lookup_max, it.num_drafts)
                if drafts:
                    out[it.req_id] = drafts
        return out
