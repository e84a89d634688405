"""W8A8: int8 weights (per output channel, symmetric) and int8 activations quantized per token
at run time (dynamic, symmetric), multiplied in int8 with int32 accumulation (``torch._int_mm``,
oneDNN: AMX-INT8 or AVX-512 VNNI where the CPU has them).

``y = (q_x @ q_w.T) * s_x[:, None] * s_w[None, :]`` with ``s_x = max_k |x[t, k]| / 127`` per row.
The prefill (compute-bound) is where this can win; a decode step (a few rows) is bandwidth-bound
and takes the weight-only int8 kernel on the same codes. The CPU's int8 matrix units are read
from /proc/cpuinfo once; without any (no ``amx_int8``, ``avx512_vnni`` or ``avx_vnni``) every
call takes the weight-only path, logged once at load.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from fleetlm.layers.linear import LinearMethod
from fleetlm.quantization.base import QuantConfig, as_2d, drop_param, staging_weight
from fleetlm.quantization.int8 import int8_linear, quantize_int8_per_channel

logger = logging.getLogger("fleetlm")
INT8_UNITS = ("amx_int8", "avx512_vnni", "avx_vnni")
_MIN_ROWS = 32  # below this the step is bandwidth-bound: weight-only int8


@functools.lru_cache(maxsize=1)
def int8_matrix_units() -> tuple[str, ...]:
    """The int8 matrix/dot-product units this CPU reports (empty when none, or not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(u for u in INT8_UNITS if u in flags)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (codes [M, K], scale fp32 [M, 1])."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / 127.0).clamp_(min=1e-10)
    return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale


class W8A8LinearMethod(LinearMethod):
    def __init__(self, use_int8_units: bool) -> None:
        self.use_int8_units = use_int8_units

    def create_weights(self, layer, in_per_rank: int, out_per_rank: int, dtype: torch.dtype) -> None:
        staging_weight(layer, in_per_rank, out_per_rank, dtype)
        layer.act_dtype = dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, scale = quantize_int8_per_channel(drop_param(layer, "weight"))
        layer.register_buffer("qweight", q, persistent=False)
        layer.register_buffer("qweight_t", q.t().contiguous(), persistent=False)  # [K, N] for _int_mm
        layer.register_buffer("scales", scale.to(layer.act_dtype), persistent=False)
        layer.register_buffer("scales_f32", scale[None, :], persistent=False)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2, lead = as_2d(x)
        if not self.use_int8_units or x2.shape[0] < _MIN_ROWS or x2.device.type != "cpu":
            y = int8_linear(x2, layer.qweight, layer.scales)
        else:
            xq, sx = quantize_rows(x2)
            acc = torch._int_mm(xq, layer.qweight_t)
            y = (acc.float().mul_(sx).mul_(layer.scales_f32)).to(x2.dtype)
        y = y.reshape(*lead, y.shape[-1])
        return y if bias is None else y + bias

    def dequantized(self, layer) -> torch.Tensor:
        return layer.qweight.float() * layer.scales.float()[:, None]


@dataclass(frozen=True)
class W8A8Config(QuantConfig):
    name: str = "w8a8"

    def linear_method(self, prefix: str) -> LinearMethod:
        units = int8_matrix_units()
        if not units:
            _log_fallback()
        return W8A8LinearMethod(bool(units))

    def lm_head(self) -> str:
        return "int8"

    def describe(self) -> str:
        units = int8_matrix_units()
        return f"w8a8 ({', '.join(units)})" if units else "w8a8 (no int8 units: weight-only int8)"


@functools.lru_cache(maxsize=1)
def _log_fallback() -> None:
    logger.warning("w8a8: this CPU reports none of %s; int8 weights run weight-only (W8A16)", ", ".join(INT8_UNITS))
