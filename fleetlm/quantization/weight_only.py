"""The weight-only configs quantized at load (int8, int4): every linear layer and the LM head."""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm.layers.linear import LinearMethod
from fleetlm.quantization.base import QuantConfig
from fleetlm.quantization.int4 import Int4LinearMethod
from fleetlm.quantization.int8 import Int8LinearMethod


@dataclass(frozen=True)
class Int8Config(QuantConfig):
    name: str = "int8"

    def linear_method(self, prefix: str) -> LinearMethod:
        return Int8LinearMethod()

    def lm_head(self) -> str:
        return "int8"


@dataclass(frozen=True)
class Int4Config(QuantConfig):
    group_size: int = 32
    name: str = "int4"

    def linear_method(self, prefix: str) -> LinearMethod:
        return Int4LinearMethod(self.group_size)

    def lm_head(self) -> str:
        return "int8"  # int4 logits move greedy choices too much; int8 keeps the head close to bf16

    def describe(self) -> str:
        return f"int4 (groups of {self.group_size})"
