"""Executor with one in-process worker (no tensor or pipeline parallelism)."""

from __future__ import annotations

from typing import Any

import torch

from fleetlm.config import EngineArgs
from fleetlm.core.sched_output import SchedulerOutput
from fleetlm.executor.base import DoneStep, Executor, StepHandle
from fleetlm.models.loader import LoadedModel
from fleetlm.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, args: EngineArgs, files: LoadedModel, dtype: torch.dtype, max_model_len: int) -> None:
        self.worker = Worker(args, dtype, max_model_len)
        self.worker.load_model(files)

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]

    def execute_model_async(self, so: SchedulerOutput) -> StepHandle:
        try:
            return DoneStep(self.worker.execute_model(so))
        except Exception as e:
            return DoneStep(error=e)

    def shutdown(self) -> None:
        self.worker = None
