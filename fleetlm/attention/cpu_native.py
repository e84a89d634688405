"""CPU backend with a compiled paged-decode kernel (``fleetlm/csrc/cpu_ops.cpp``).

Decodes read K/V in place through the block table instead of gathering them into a padded copy
first; prefills are the pure-PyTorch backend's. The kernel is built by ``fleetlm.ops``; if it
cannot be built, ``auto`` selects ``torch_paged``.
"""

from __future__ import annotations

import numpy as np
import torch

from fleetlm.attention.base import BatchLayout
from fleetlm.attention.torch_paged import TorchPagedBackend
from fleetlm.ops import cpu_ops


class CpuNativeBackend(TorchPagedBackend):
    name = "cpu_native"

    def __init__(self, block_size: int, dtype: torch.dtype, kv_format=None) -> None:
        super().__init__(block_size, dtype, kv_format)  # the kernel reads int8 / fp8 caches in place
        self.kernel = cpu_ops()
        if self.kernel is None:
            raise RuntimeError("the cpu_native attention kernel could not be built on this machine")

    def _decode_metadata(self, layout: BatchLayout, device: torch.device) -> tuple[torch.Tensor, None]:
        return torch.from_numpy(np.ascontiguousarray(layout.block_table[: layout.num_decodes])), None

    def _decode(self, q, kv_cache, meta) -> torch.Tensor:
        return self.kernel.paged_decode(q.contiguous(), kv_cache, meta.decode_block_table,
                                        meta.decode_seq_lens, q.shape[-1] ** -0.5)
