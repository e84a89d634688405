"""Engine configuration: frozen dataclasses, derived values as properties.

``EngineArgs`` is what users pass (``LLM(model, **kwargs)``); unknown keyword arguments are an
error, never ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """Resolve ``dtype`` ("auto" = bf16 where the device does it well, else fp32)."""
    if isinstance(dtype, torch.dtype):
        out = dtype
    elif dtype == "auto":
        out = torch.bfloat16 if device == "cuda" or _cpu_has_fast_bf16() else torch.float32
    elif dtype in _DTYPES:
        out = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of: auto, {', '.join(sorted(set(_DTYPES)))}")
    if device == "cpu" and out == torch.float16:
        raise ValueError("dtype float16 is not supported on the CPU (no fast fp16 matmul); use bfloat16 or float32")
    if device == "cuda" and out == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("dtype bfloat16 is not supported on this GPU; use float16 or float32")
    return out


def _cpu_has_fast_bf16() -> bool:
    try:
        return "bf16" in torch.backends.cpu.get_cpu_capability().lower() or _cpuinfo_has("avx512_bf16")
    except Exception:
        return False


def _cpuinfo_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read()
    except OSError:
        return False


@dataclass(frozen=True)
class EngineArgs:
    """Everything a user can set. Validated in ``__post_init__``."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # default: the model's context length, capped at 8192
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV cache on CPU (default 2 GiB)
    gpu_memory_utilization: float | None = None  # CUDA only: fraction of free memory (default 0.9)
    num_kv_blocks: int | None = None  # override the budget (tests: force preemption)
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    num_threads: int | None = None  # CPU intra-op threads (default: all cores)
    attention_backend: str = "auto"  # auto | torch_paged | cpu_native
    seed: int = 0  # seeds the sampling of requests that have no seed of their own
    tensor_parallel_size: int = 1  # ranks that split every layer's heads and matrices
    pipeline_parallel_size: int = 1  # stages that split the layers
    distributed_executor_backend: str = "auto"  # auto | uniproc | multiproc
    pipeline_layer_partition: tuple[int, ...] | None = None  # layers per stage (default: even split)
    scheduling_policy: str = "fcfs"  # fcfs (priority, then arrival) | fair (per-tenant VTC fair share)
    data_parallel_size: int = 1  # engine cores, each its own process and KV cache, behind one front end
    data_parallel_policy: str = "least_load"  # how the front end picks a core (fleetlm/router/policies.py)
    kv_events_endpoint: str | None = None  # ZMQ PUB endpoint for KV events (tcp://host:port | ipc://path)
    speculative_config: dict | None = field(default=None, hash=False)  # vLLM's spelling (fleetlm/spec_decode)
    enable_expert_parallel: bool = False  # MoE: shard whole experts over the TP ranks (fleetlm/moe)
    moe_capacity_factor: float | None = None  # MoE: per-expert capacity factor (None: unlimited)
    moe_overflow_policy: str = "reroute"  # MoE: drop | reroute assignments over capacity
    moe_ep_dispatch: str = "all_to_all"  # MoE with expert parallelism: all_to_all | all_reduce
    moe_replica_slots: int = 0  # MoE with expert parallelism: spare slots per rank for hot-expert copies
    moe_rebalance_interval: int = 0  # MoE: forwards between replica rebalances (0: never move copies)
    kv_transfer_config: dict | None = field(default=None, hash=False)  # disaggregated prefill/decode (fleetlm/disagg)
    quantization: str | None = None  # int8 | int4[_g32|_g64|_g128] | w8a8 (fleetlm/quantization); GGUF: kept as shipped
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | int8 | fp8_e4m3
    enable_lora: bool = False  # serve LoRA adapters (fleetlm/lora); implied by lora_modules
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, PEFT directory) loaded at start
    max_loras: int = 8  # adapters loaded at once (each is resident on every rank)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if self.num_kv_blocks is not None and self.kv_cache_memory is not None:
            raise ValueError("set num_kv_blocks or kv_cache_memory, not both: they size the same KV cache")
        if self.gpu_memory_utilization is not None and self.kv_cache_memory is not None:
            raise ValueError("set gpu_memory_utilization or kv_cache_memory, not both: they size the same KV cache")
        if self.gpu_memory_utilization is not None:
            if not 0.0 < self.gpu_memory_utilization <= 1.0:
                raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
            if self.resolved_device != "cuda":
                raise ValueError("gpu_memory_utilization applies to CUDA only; on the CPU size the KV cache with kv_cache_memory")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.attention_backend not in ("auto", "torch_paged", "cpu_native"):
            raise ValueError(f"attention_backend must be auto, torch_paged or cpu_native, got {self.attention_backend!r}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.pipeline_layer_partition is not None:
            if not isinstance(self.pipeline_layer_partition, (tuple, list)):
                raise ValueError(f"pipeline_layer_partition must be a list of layer counts, got "
                                 f"{self.pipeline_layer_partition!r}")
            part = tuple(self.pipeline_layer_partition)
            if len(part) != self.pipeline_parallel_size or any(not isinstance(n, int) or n < 1 for n in part):
                raise ValueError(f"pipeline_layer_partition must give pipeline_parallel_size "
                                 f"({self.pipeline_parallel_size}) layer counts >= 1, got {part}")
            object.__setattr__(self, "pipeline_layer_partition", part)
        if self.scheduling_policy not in ("fcfs", "fair"):
            raise ValueError(f"scheduling_policy must be fcfs or fair, got {self.scheduling_policy!r}")
        if self.distributed_executor_backend not in ("auto", "uniproc", "multiproc", "ray"):
            raise ValueError("distributed_executor_backend must be auto, uniproc, multiproc or ray, got "
                             f"{self.distributed_executor_backend!r}")
        if self.distributed_executor_backend in ("multiproc", "ray") and self.world_size == 1:
            raise ValueError(f"distributed_executor_backend {self.distributed_executor_backend!r} needs "
                             "tensor_parallel_size x pipeline_parallel_size > 1; one rank runs 'uniproc' (or "
                             "leave it 'auto')")
        if self.distributed_executor_backend == "uniproc" and self.world_size > 1:
            raise ValueError(f"distributed_executor_backend 'uniproc' runs one rank, but tensor_parallel_size x "
                             f"pipeline_parallel_size = {self.world_size}; use 'multiproc' (or 'auto')")
        self._check_data_parallel()
        self._check_speculative()
        from fleetlm.moe.config import check_runtime

        check_runtime(self.moe_capacity_factor, self.moe_overflow_policy, self.moe_ep_dispatch,
                      self.moe_replica_slots, self.moe_rebalance_interval)
        if self.kv_transfer_config is not None:
            from fleetlm.disagg.config import KVTransferConfig

            object.__setattr__(self, "kv_transfer_config", KVTransferConfig.parse(self.kv_transfer_config))
            if self.data_parallel_size > 1:
                raise ValueError("kv_transfer_config: disaggregated prefill/decode runs one engine core per "
                                 "worker (data_parallel_size 1); run more workers instead")
        self._check_quantization()
        self._check_lora()
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA device is available")

    def _check_speculative(self) -> None:
        if self.speculative_config is None:
            return
        from fleetlm.spec_decode.config import SpeculativeConfig

        object.__setattr__(self, "speculative_config", SpeculativeConfig.from_dict(self.speculative_config))
        if self.world_size > 1:
            raise ValueError("speculative_config: speculative decoding runs with one rank for now "
                             "(tensor_parallel_size = pipeline_parallel_size = 1)")

    def _check_lora(self) -> None:
        if self.lora_modules:
            from fleetlm.lora.request import check_lora_name

            items = self.lora_modules.items() if isinstance(self.lora_modules, dict) else self.lora_modules
            mods = tuple((check_lora_name(n), str(p)) for n, p in items)
            if len({n for n, _ in mods}) != len(mods):
                raise ValueError("lora_modules names an adapter twice")
            object.__setattr__(self, "lora_modules", mods)
            object.__setattr__(self, "enable_lora", True)
        if not isinstance(self.max_loras, int) or isinstance(self.max_loras, bool) or self.max_loras < 1:
            raise ValueError(f"max_loras must be a positive integer, got {self.max_loras!r}")
        if len(self.lora_modules) > self.max_loras:
            raise ValueError(f"lora_modules lists {len(self.lora_modules)} adapters, more than max_loras "
                             f"({self.max_loras})")
        if self.enable_lora and self.tensor_parallel_size > 1:
            raise ValueError("LoRA adapters are served at tensor_parallel_size 1 for now")
        if self.enable_lora and self.speculative_config is not None:
            raise ValueError("LoRA adapters with speculative decoding are not supported yet: drafts would "
                             "come from the base model's weights")

    def _check_quantization(self) -> None:
        from fleetlm.quantization import check_quantization
        from fleetlm.quantization.kv import check_kv_cache_dtype

        check_quantization(self.quantization)
        check_kv_cache_dtype(self.kv_cache_dtype, self.resolved_device)

    def _check_data_parallel(self) -> None:
        if self.kv_events_endpoint is not None:
            from fleetlm.core.kv_events import check_endpoint

            check_endpoint(self.kv_events_endpoint)
        from fleetlm.router.policies import check_dp_policy

        check_dp_policy(self.data_parallel_policy)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}; accepted: {', '.join(sorted(names))}")
        return cls(model=model, **kwargs)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def stage_layers(self, num_layers: int) -> list[range]:
        """Layers of each pipeline stage: the given partition, or as even as possible."""
        from fleetlm.plan.memory import stage_layers

        part = self.pipeline_layer_partition
        if part is None:
            return stage_layers(num_layers, self.pipeline_parallel_size)
        if sum(part) != num_layers:
            raise ValueError(f"pipeline_layer_partition {list(part)} sums to {sum(part)}, but the model has "
                             f"{num_layers} layers")
        starts = [sum(part[:i]) for i in range(len(part))]
        return [range(a, a + n) for a, n in zip(starts, part)]

    @property
    def executor_backend(self) -> str:
        if self.distributed_executor_backend != "auto":
            return self.distributed_executor_backend
        return "multiproc" if self.world_size > 1 else "uniproc"

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    max_concurrent_batches: int = 1  # steps in flight at once (pipeline stages)
    scheduling_policy: str = "fcfs"  # fcfs | fair (per-tenant fair share; core/fair_queue.py)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool

    @property
    def max_tokens(self) -> int:
        return self.block_size * self.num_blocks
