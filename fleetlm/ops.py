"""The compiled CPU ops (``csrc/cpu_ops.cpp``, ``csrc/gemv.cpp``, ``csrc/paged_decode.cpp``,
``csrc/int4_q8.cpp``, ``csrc/int8_q8.cpp``): paged decode attention, fused elementwise ops,
quantized-weight kernels (int4 x int8 and int8 x int8 for decode among them) and the bf16 decode
GEMV.

Built on first use with ``torch.utils.cpp_extension`` (needs a C++ compiler and ninja; the
build is cached). ``cpu_ops()`` returns None when it cannot be built, and callers fall back to
plain PyTorch. ``FLEETLM_NO_CPU_OPS=1`` forces that fallback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("fleetlm")
_SRCS = [Path(__file__).parent / "csrc" / name for name in ("cpu_ops.cpp", "gemv.cpp", "paged_decode.cpp", "int4_q8.cpp", "int8_q8.cpp")]
_MODULE: Any = None
_TRIED = False


def cpu_ops() -> Any:
    global _MODULE, _TRIED
    if not _TRIED:
        _TRIED = True
        if os.environ.get("FLEETLM_NO_CPU_OPS") == "1":
            return None
        try:
            from torch.utils.cpp_extension import load

            logger.info("loading fleetlm CPU ops (compiled on first use, ~30 s)")
            _MODULE = load(name="fleetlm_cpu_ops", sources=[str(p) for p in _SRCS],
                           extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: plain PyTorch
            logger.warning("fleetlm CPU ops unavailable (%s); using plain PyTorch", str(e).splitlines()[0][:200])
    return _MODULE
