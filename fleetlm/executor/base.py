"""The executor interface and its registry.

An executor runs the workers of one engine: ``uniproc`` (one worker in this process) or
``multiproc`` (one worker per tensor/pipeline-parallel rank: rank 0 in this process, the others
in their own processes, started here or by ``torchrun``). The engine core only ever calls:

- ``determine_num_blocks`` / ``initialize_cache``: size the KV cache (the minimum over ranks);
- ``execute_model(so)``: run one step, return the output rank's ``ModelRunnerOutput``;
- ``execute_model_async(so)``: the same, returning a handle whose ``result()`` waits, so that a
  pipeline can hold several steps in flight (``max_concurrent_batches`` of them);
- ``collective_rpc(method, ...)``: any worker method on every rank, results in rank order.

A step that raised on every rank before any collective, or on the output rank only after the
last one (while sampling), is a ``StepError``: the engine retries its requests one by one.
Anything else that breaks a rank (a crash, an error inside the forward pass, an error on some
ranks only) is ``EngineDeadError``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

from fleetlm.core.sched_output import ModelRunnerOutput, SchedulerOutput


class EngineDeadError(RuntimeError):
    """The engine cannot run any more steps (a worker died or the ranks disagree)."""


class StepError(RuntimeError):
    """A step raised on every rank before any collective: the engine can go on."""


class StepHandle(ABC):
    @abstractmethod
    def result(self) -> ModelRunnerOutput: ...


class DoneStep(StepHandle):
    def __init__(self, out: ModelRunnerOutput | None = None, error: BaseException | None = None) -> None:
        self.out, self.error = out, error

    def result(self) -> ModelRunnerOutput:
        if self.error is not None:
            raise self.error
        return self.out


class Executor(ABC):
    max_concurrent_batches: int = 1

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any) -> list[Any]: ...

    @abstractmethod
    def execute_model_async(self, so: SchedulerOutput) -> StepHandle: ...

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(so).result()

    def determine_num_blocks(self) -> int:
        return min(self.collective_rpc("determine_num_blocks"))

    def initialize_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_cache", num_blocks)

    def check_health(self) -> None:  # noqa: B027 - a single process has nothing to check
        """Raise ``EngineDeadError`` if a worker is gone."""

    @abstractmethod
    def shutdown(self) -> None: ...


EXECUTORS = {
    "uniproc": "fleetlm.executor.uniproc:UniProcExecutor",
    "multiproc": "fleetlm.executor.multiproc:MultiprocExecutor",
    "ray": "fleetlm.executor.ray_executor:RayExecutor",  # ranks 1.. as Ray actors (fleetlm[ray])
}


def get_executor_class(name: str) -> type[Executor]:
    if name not in EXECUTORS:
        raise ValueError(f"distributed_executor_backend {name!r} is not known; choose one of: "
                         f"auto, {', '.join(EXECUTORS)}")
    module, cls = EXECUTORS[name].split(":")
    return getattr(importlib.import_module(module), cls)
