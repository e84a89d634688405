"""The attention-backend interface and the forward context.

The model runner builds one backend-specific metadata object per step and installs it with
``forward_context(...)``; each ``Attention`` layer reads it from there, so model code never sees
scheduler types. Token layout inside a step: the decode tokens (one per decoding request) come
first, then the prefill tokens of each prefilling request, contiguous per request.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class BatchLayout:
    """Backend-neutral description of one step's batch (numpy arrays, one row per request)."""

    query_lens: np.ndarray  # tokens computed this step, per request
    context_lens: np.ndarray  # tokens already in the KV cache before this step
    block_table: np.ndarray  # [num_reqs, max_blocks] block ids, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of each token
    num_decodes: int  # the first num_decodes requests have query_len == 1
    # per request, None or a bool [q, q] tree mask over its own query rows (row r may see row c;
    # the cached context is always visible): tree verification (fleetlm/spec_decode/tree.py)
    tree_masks: tuple[np.ndarray | None, ...] | None = None

    @property
    def seq_lens(self) -> np.ndarray:
        return self.context_lens + self.query_lens


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def build_metadata(self, layout: BatchLayout, device: torch.device) -> Any: ...

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: Any) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D], kv_cache [2, num_blocks, block_size, Hkv, D] of this
        layer. Writes k/v into the cache at ``meta``'s slots, then attends; returns [T, H, D]."""


@dataclass
class ForwardContext:
    backend: AttentionBackend
    meta: Any
    kv_caches: dict[int, torch.Tensor]  # layer index -> that layer's cache (this stage's layers)


_CTX: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    global _CTX
    prev, _CTX = _CTX, ctx
    try:
        yield
    finally:
        _CTX = prev


def current_forward_context() -> ForwardContext | None:
    """The step's context, or None outside the paged engine (training, plain forward)."""
    return _CTX


def get_forward_context() -> ForwardContext:
    if _CTX is None:
        raise RuntimeError("attention called outside forward_context(): no KV cache metadata installed")
    return _CTX
