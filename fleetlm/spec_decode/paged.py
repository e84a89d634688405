"""One paged forward of a draft over a batch of token runs, through the target's attention
backend and block tables, into whichever KV caches the draft owns.

A run is ``(tokens, start position, block ids)``: its K/V go to the slots of positions
``start .. start + len(tokens) - 1`` in those blocks; the positions before ``start`` must already
hold this cache's K/V. Rows are laid out as the backends expect (single-token runs first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fleetlm.attention.base import BatchLayout, ForwardContext, forward_context


@dataclass(frozen=True)
class Run:
    tokens: list[int]
    start: int
    block_ids: list[int]


def paged_forward(runner, runs: list[Run], kv_caches: dict[int, torch.Tensor],
                  fn: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]) -> torch.Tensor:
    """Call ``fn(input_ids, positions, order)`` inside a forward context for ``runs`` and
    return, per run in the given order, the row of its last token in ``fn``'s output.
    ``order`` lists run indices in layout order (rows of a run are contiguous)."""
    bs = runner.block_size
    for run in runs:  # a slot past the request's blocks would land in whatever block 0 holds
        if run.start + len(run.tokens) > len(run.block_ids) * bs:
            raise RuntimeError(f"draft positions up to {run.start + len(run.tokens) - 1} exceed the "
                               f"{len(run.block_ids)} blocks allocated")
    order = sorted(range(len(runs)), key=lambda i: len(runs[i].tokens) != 1)
    q = np.array([len(runs[i].tokens) for i in order], dtype=np.int64)
    ctx = np.array([runs[i].start for i in order], dtype=np.int64)
    width = max(len(runs[i].block_ids) for i in order)
    table = np.zeros((len(order), width), dtype=np.int64)
    tokens: list[int] = []
    for r, i in enumerate(order):
        table[r, : len(runs[i].block_ids)] = runs[i].block_ids
        tokens += runs[i].tokens
    rows = np.repeat(np.arange(len(order)), q)
    positions = np.arange(len(tokens)) - np.repeat(np.cumsum(q) - q, q) + ctx[rows]
    slots = table[rows, positions // bs] * bs + positions % bs
    layout = BatchLayout(q, ctx, table, torch.from_numpy(slots), int((q == 1).sum()))
    dev = runner.device
    meta = runner.backend.build_metadata(layout, dev)
    with forward_context(ForwardContext(runner.backend, meta, kv_caches)):
        out = fn(torch.tensor(tokens, device=dev), torch.from_numpy(positions).to(dev), order)
    last = np.cumsum(q) - 1
    where = np.empty(len(runs), dtype=np.int64)
    where[order] = last
    return out.index_select(0, torch.from_numpy(where).to(out.device))
