"""What the user asks of a deployment (``Workload``) and how it is split over GPUs (``Layout``)."""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm.plan.errors import PlanError


@dataclass(frozen=True)
class Workload:
    """An inference workload.

    ``context`` is the longest sequence (prompt + output) the KV cache must hold; the decode
    step is evaluated at the mean KV length while generating, ``input_len + output_len / 2``.
    ``memory_utilization`` is the fraction of device memory the engine may use (vLLM's
    ``gpu_memory_utilization``); ``max_batched_tokens`` sizes the activation peak of one step.
    """

    context: int = 4096
    concurrency: int = 1
    output_len: int = 256
    input_len: int | None = None
    kv_dtype: str = "bf16"
    block_size: int = 16
    max_batched_tokens: int = 8192
    memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        for name in ("context", "concurrency", "output_len", "block_size", "max_batched_tokens"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.memory_utilization <= 1:
            raise PlanError(f"memory utilization must be in (0, 1], got {self.memory_utilization}")
        if self.input_len is not None and self.input_len + self.output_len > self.context:
            raise PlanError(f"input length {self.input_len} + output length {self.output_len} "
                            f"exceeds the context {self.context}")

    @property
    def prompt_len(self) -> int:
        if self.input_len is not None:
            return self.input_len
        return max(1, self.context - min(self.output_len, self.context // 2))

    @property
    def gen_len(self) -> int:
        return min(self.output_len, self.context - self.prompt_len) or 1

    @property
    def decode_context(self) -> int:
        """Mean KV length seen by a decode step."""
        return self.prompt_len + self.gen_len // 2


@dataclass(frozen=True)
class Layout:
    """Parallel degrees. A replica is ``tp * pp * cp`` GPUs; ``dp`` replicas serve in parallel.

    Experts are sharded over ``ep`` GPUs: ``ep == tp`` keeps them inside one replica, a larger
    ``ep`` spreads them over ``ep / tp`` replicas (attention data-parallel, wide EP).
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    cp: int = 1

    @property
    def replica_gpus(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def gpus(self) -> int:
        return self.replica_gpus * self.dp

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, "dp": self.dp, "cp": self.cp}
