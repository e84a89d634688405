"""CPU backend with a compiled paged-decode kernel (``csrc/paged_decode.cpp``).

Decodes read K/V in place through the block table instead of gathering them into a padded copy
first; prefills are the pure-PyTorch backend's. The kernel is compiled on first use with
``torch.utils.cpp_extension`` (a C++ compiler and ninja; cached afterwards). If it cannot be
built, ``load_kernel`` returns None and the engine stays on ``torch_paged``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fleetlm.attention.base import BatchLayout
from fleetlm.attention.torch_paged import TorchPagedBackend

logger = logging.getLogger("fleetlm")
_SRC = Path(__file__).parent / "csrc" / "paged_decode.cpp"
_KERNEL = None
_TRIED = False


def load_kernel():
    """Compile (first time) and import the extension; None if this machine cannot build it."""
    global _KERNEL, _TRIED
    if not _TRIED:
        _TRIED = True
        try:
            from torch.utils.cpp_extension import load

            logger.info("loading the CPU paged-decode kernel (compiled on first use, ~30 s)")
            _KERNEL = load(name="fleetlm_paged_decode", sources=[str(_SRC)],
                           extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: use the pure-PyTorch path
            logger.warning("CPU paged-decode kernel unavailable (%s); using torch_paged", str(e).splitlines()[0][:200])
    return _KERNEL


class CpuNativeBackend(TorchPagedBackend):
    name = "cpu_native"

    def __init__(self, block_size: int, dtype: torch.dtype) -> None:
        super().__init__(block_size, dtype)
        self.kernel = load_kernel()
        if self.kernel is None:
            raise RuntimeError("the cpu_native attention kernel could not be built on this machine")

    def _decode_metadata(self, layout: BatchLayout, device: torch.device) -> tuple[torch.Tensor, None]:
        return torch.from_numpy(np.ascontiguousarray(layout.block_table[: layout.num_decodes])), None

    def _decode(self, q, kv_cache, meta) -> torch.Tensor:
        return self.kernel.paged_decode(q.contiguous(), kv_cache, meta.decode_block_table,
                                        meta.decode_seq_lens, q.shape[-1] ** -0.5)
