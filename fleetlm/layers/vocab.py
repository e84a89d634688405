"""Vocabulary-parallel embedding and LM head: each TP rank holds ``ceil(vocab / tp)`` rows.

The embedding looks up the ids that fall in this rank's range, zeroes the others and sums over
the TP group. The LM head computes this rank's logits and gathers them on TP rank 0, only for the
rows that are given to it (the model runner passes only the rows that sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.distributed.communication import (
    tensor_model_parallel_all_reduce,
    tensor_model_parallel_gather,
)
from fleetlm.distributed.parallel_state import parallel_state
from fleetlm.layers import gemv


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype) -> None:
        super().__init__()
        st = parallel_state()
        self.tp_rank, self.tp_size = st.tp_rank, st.tp_size
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // st.tp_size)
        self.start = st.tp_rank * self.per_rank
        self.end = min(self.start + self.per_rank, vocab_size)  # rows past the vocab stay zero (padding)
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size, dtype=dtype), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
            raise ValueError(f"weight has shape {tuple(loaded.shape)}, expected {(self.vocab_size, param.shape[1])}")
        n = self.end - self.start
        with torch.no_grad():
            param.data[:n].copy_(loaded[self.start : self.end])
            param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        inside = (input_ids >= self.start) & (input_ids < self.end)
        out = F.embedding((input_ids - self.start) * inside, self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states -> logits. ``tie_to`` shares the embedding's weight (tied embeddings)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype,
                 tie_to: VocabParallelEmbedding | None = None) -> None:
        super().__init__(vocab_size, hidden_size, dtype=dtype)
        if tie_to is not None:
            self.weight = tie_to.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """fp32 logits [rows, vocab] on TP rank 0 (None on the other ranks)."""
        local = gemv.linear(hidden, self.weight, None, self)
        full = tensor_model_parallel_gather(local, dim=-1)
        if full is None:
            return None
        return full[..., : self.vocab_size].float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # training: logits on every rank
        from fleetlm.distributed.communication import tensor_model_parallel_all_gather

        return tensor_model_parallel_all_gather(F.linear(hidden, self.weight), dim=-1)[..., : self.vocab_size]
