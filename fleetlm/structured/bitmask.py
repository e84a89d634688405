"""The grammar's allowed-token bitmask on the worker side (no xgrammar needed here).

A bitmask row is ``ceil(vocab / 32)`` int32 words: bit ``j`` of word ``w`` set means token
``32 * w + j`` may be sampled. The sampler applies the rows of the whole batch in one op: the
words are read as bytes and each byte picks its 8 additive biases (0 or -inf) from a 256-entry
table, which costs about a third of unpacking the bits one by one on CPU.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

_BYTE_BITS = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # [256, 8]: bit k of byte value b
_BIAS = torch.where(_BYTE_BITS.bool(), 0.0, float("-inf"))


@dataclass(frozen=True)
class GrammarBitmask:
    """Allowed next tokens of the requests that sample under a grammar in one step: row ``i``
    of ``bitmask`` is for ``req_ids[i]``. A request verifying ``k`` speculative drafts has
    ``k + 1`` rows in a row, one per position (the grammar's state after ``drafts[:j]``)."""

    req_ids: tuple[str, ...]
    bitmask: torch.Tensor  # [len(req_ids), ceil(vocab / 32)] int32

    def rows_for(self, order: list[str]) -> torch.Tensor | None:
        """The mask laid out as the sampler's rows ``order`` (the ``j``-th occurrence of a
        request takes its ``j``-th row); a row without a grammar allows every token (all bits
        set). None if no row of ``order`` has a grammar."""
        index: dict[str, list[int]] = {}
        for i, rid in enumerate(self.req_ids):
            index.setdefault(rid, []).append(i)
        seen: dict[str, int] = {}
        picks = []
        for rid in order:
            rows, j = index.get(rid), seen.get(rid, 0)
            seen[rid] = j + 1
            picks.append(rows[min(j, len(rows) - 1)] if rows else -1)
        if all(p < 0 for p in picks):
            return None
        if picks == list(range(len(self.req_ids))):
            return self.bitmask
        ones = torch.full((1, self.bitmask.shape[1]), -1, dtype=torch.int32)  # the last row: no grammar
        last = len(self.req_ids)
        return torch.cat((self.bitmask, ones)).index_select(0, torch.tensor([p if p >= 0 else last for p in picks]))

    def subset(self, req_ids: set[str]) -> GrammarBitmask | None:
        keep = [i for i, rid in enumerate(self.req_ids) if rid in req_ids]
        if not keep:
            return None
        return GrammarBitmask(tuple(self.req_ids[i] for i in keep), self.bitmask[keep])


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits of tokens the bitmask forbids to -inf, in place (``[B, V]`` and
    ``[B, ceil(V / 32)]`` int32); padding bits past ``V`` are ignored."""
    rows, vocab = logits.shape
    if sys.byteorder == "little":
        bias = _BIAS.to(logits.device, logits.dtype)[bitmask.to(logits.device).view(torch.uint8).long()]
        return logits.add_(bias.view(rows, -1)[:, :vocab])
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.to(logits.device).unsqueeze(-1) >> bits) & 1).bool().view(rows, -1)[:, :vocab]
    return logits.masked_fill_(~allowed, float("-inf"))
