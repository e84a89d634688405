"""What every quantization format provides: a ``QuantConfig`` that hands each linear layer its
``LinearMethod`` and says how the LM head is computed.

Lifecycle of a quantized layer (``layers/linear.py``): ``create_weights`` registers what the
checkpoint fills (a full-precision staging ``weight`` for formats quantized at load, or the
format's own codes and scales for pre-quantized checkpoints), the layer's ``weight_loader``
keeps this TP rank's slice of each, and ``process_weights_after_loading`` turns them into the
kernel's layout (each rank quantizes its own slice) and frees the staging tensors.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from fleetlm.layers.linear import LinearMethod, UnquantizedLinearMethod


class QuantConfig(ABC):
    """One quantization format for a whole model."""

    name: str

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod:
        """The method for the linear layer named ``prefix`` (e.g. ``model.layers.3.mlp.down_proj``)."""

    def moe_method(self, prefix: str):
        """The ``MoEMethod`` (``layers/moe.py``) for the routed experts named ``prefix``
        (``model.layers.3.mlp.experts``); None: unquantized experts."""
        return None

    def lm_head(self) -> str | None:
        """How the LM head computes logits: ``"int8"`` (``lm_head.Int8LMHead``) or None
        (unquantized, as without quantization)."""
        return None

    def describe(self) -> str:
        return self.name


def staging_weight(layer: nn.Module, in_per_rank: int, out_per_rank: int, dtype: torch.dtype) -> None:
    """The full-precision ``weight`` a quantize-at-load method fills before it quantizes."""
    UnquantizedLinearMethod().create_weights(layer, in_per_rank, out_per_rank, dtype)


def drop_param(layer: nn.Module, name: str) -> torch.Tensor:
    """Remove parameter ``name`` from ``layer`` and return its data."""
    t = getattr(layer, name).data
    delattr(layer, name)
    return t


def as_2d(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` as a contiguous [rows, features] matrix, and the leading shape to restore."""
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]).contiguous(), lead


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (shared tensors counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def int8_activation_kernels() -> Any:
    """The compiled ops when layers loaded now may round decode activations to int8 per 32 values
    (``int4_q8_linear``, ``int8_q8_linear``: a machine with AVX512-VNNI), else None.
    ``FLEETLM_INT8_ACTIVATIONS=0`` keeps bf16 activations everywhere."""
    from fleetlm.ops import cpu_ops

    if os.environ.get("FLEETLM_INT8_ACTIVATIONS", "1") == "0":
        return None
    ops = cpu_ops()
    return ops if ops is not None and ops.q8_isa() == "avx512vnni" else None
