"""fleetlm.plan: capacity planning (memory, KV sizing, roofline, parallelism, training).

Cheap to import (no torch, rich or matplotlib). The engine sizes its KV cache with::

    from fleetlm.plan import kv_cache_bytes_per_token, kv_cache_num_blocks
    per_token = kv_cache_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes)
    num_blocks = kv_cache_num_blocks(budget_bytes, block_size, per_token)

Whole plans::

    from fleetlm.plan import Workload, get_hardware, load_model_spec, plan_inference
    report = plan_inference(load_model_spec("llama-3.1-70b"), get_hardware("h100-sxm"), gpus=8,
                            workload=Workload(context=8192, concurrency=64))
    report.as_json()["max_concurrent_seqs"]

See docs/PLAN.md for the arithmetic.
"""

from __future__ import annotations

from typing import Any

from fleetlm.plan.errors import PlanError
from fleetlm.plan.kv import kv_cache_bytes_per_token, kv_cache_num_blocks

__all__ = [
    "kv_cache_bytes_per_token", "kv_cache_num_blocks", "PlanError",
    "ModelSpec", "count_params", "load_model_spec", "spec_from_config", "spec_from_gguf",
    "HardwareSpec", "get_hardware", "Workload", "Layout", "Forced", "plan_inference",
    "plan_training", "memory_plan", "weights_bytes", "step_cost", "Machine",
]

_LAZY = {
    "ModelSpec": "model_spec", "count_params": "model_spec",
    "load_model_spec": "model_load", "spec_from_config": "model_load", "spec_from_gguf": "model_load",
    "HardwareSpec": "hardware", "get_hardware": "hardware",
    "Workload": "workload", "Layout": "workload", "Forced": "parallel",
    "plan_inference": "report", "plan_training": "train_report",
    "memory_plan": "memory", "weights_bytes": "memory",
    "step_cost": "roofline", "Machine": "roofline",
}


def __getattr__(name: str) -> Any:  # lazy: keeps `import fleetlm.plan` to two tiny modules
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fleetlm.plan' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"fleetlm.plan.{module}"), name)
