"""Which compiled CPU ops a layer uses, decided once when the layer is built.

The fused kernels (``fleetlm/csrc/cpu_ops.cpp``) serve bf16/fp16 on the CPU. fp32 keeps the
reference formulas, op for op with transformers; CUDA uses PyTorch's own kernels. The device is
the one the model is being built on (``with torch.device(...)``).
"""

from __future__ import annotations

from typing import Any

import torch


def fused_ops_for(dtype: torch.dtype) -> Any:
    if dtype == torch.float32 or torch.get_default_device().type != "cpu":
        return None
    from fleetlm.ops import cpu_ops

    return cpu_ops()
