"""An LM head that computes logits through a quantized copy of its weight.

Every decode step multiplies by the whole vocabulary matrix (28% of SmolLM2's weights), so the
weight-only formats quantize it too (int8 per output row, as llama.cpp quantizes its output
matrix). The embedding lookup keeps the full-precision table: with tied embeddings the head holds
its own int8 copy beside it.
"""

from __future__ import annotations

import torch
from torch import nn

from fleetlm.distributed.communication import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_gather,
)
from fleetlm.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from fleetlm.quantization.int8 import int8_linear, quantize_int8_per_channel


class Int8LMHead(ParallelLMHead):
    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype,
                 tie_to: VocabParallelEmbedding | None = None) -> None:
        super().__init__(vocab_size, hidden_size, dtype=dtype, tie_to=tie_to)
        self.tied = tie_to is not None
        self.act_dtype = dtype

    def process_weights_after_loading(self) -> None:
        q, scale = quantize_int8_per_channel(self.weight.data)
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scales", scale.to(self.act_dtype), persistent=False)
        if not self.tied:  # nothing else reads the full-precision matrix
            del self.weight
            self.weight = nn.Parameter(torch.empty(0, dtype=self.act_dtype), requires_grad=False)

    def _local(self, hidden: torch.Tensor) -> torch.Tensor:
        return int8_linear(hidden, self.qweight, self.scales)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        full = tensor_model_parallel_gather(self._local(hidden), dim=-1)
        return None if full is None else full[..., : self.vocab_size].float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return tensor_model_parallel_all_gather(self._local(hidden), dim=-1)[..., : self.vocab_size]


class Int8GroupLMHead(Int8LMHead):
    """The head of a GGUF whose output matrix (or tied embedding) is Q8_0: its codes and block
    scales exactly as shipped (``lm_head.qweight`` / ``lm_head.scales``), computed by the
    group-wise int8 method; the embedding lookup reads the dequantized table."""

    group_size = 32

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype,
                 tie_to: VocabParallelEmbedding | None = None) -> None:
        from fleetlm.quantization.int8_group import Int8GroupLinearMethod

        super().__init__(vocab_size, hidden_size, dtype=dtype, tie_to=tie_to)
        if not self.tied:  # an empty buffer, not a parameter: the checkpoint has no full matrix to fill
            del self.weight
            self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)
        self.method = Int8GroupLinearMethod(self.group_size)
        self.method.create_weights(self, hidden_size, self.per_rank, dtype)

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def dense_twin(self) -> torch.Tensor | None:
        """The same weights dequantized, when this rank holds them anyway: a tied head's embedding
        table (the GGUF's matrix dequantized for lookups). The GEMM of many rows reads it."""
        return self.weight if self.tied else None

    def _local(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, hidden, None)


class Int8Group16LMHead(Int8GroupLMHead):
    """A GGUF Q6_K output matrix as shipped: int8 codes ``q - 32``, one scale per 16 weights."""

    group_size = 16


def lm_head_class(kind: str) -> type[ParallelLMHead]:
    """``QuantConfig.lm_head()`` -> the head class: ``int8`` (per row, quantized at load),
    ``int8_group`` (GGUF Q8_0 as shipped) or ``int8_group16`` (GGUF Q6_K as shipped)."""
    return {"int8": Int8LMHead, "int8_group": Int8GroupLMHead, "int8_group16": Int8Group16LMHead}[kind]
