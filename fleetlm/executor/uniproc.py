"""Executor with one in-process worker. A multi-process executor keeps this interface and sends
each call to every rank's worker (``collective_rpc``), returning rank 0's result."""

from __future__ import annotations

from typing import Any

import torch

from fleetlm.config import EngineArgs
from fleetlm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from fleetlm.models.loader import LoadedModel
from fleetlm.worker.worker import Worker


class UniProcExecutor:
    def __init__(self, args: EngineArgs, files: LoadedModel, dtype: torch.dtype, max_model_len: int) -> None:
        self.worker = Worker(args, dtype, max_model_len)
        self.worker.load_model(files)

    def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args, **kwargs)]

    def determine_num_blocks(self) -> int:
        return self.collective_rpc("determine_num_blocks")[0]

    def initialize_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_cache", num_blocks)

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.collective_rpc("execute_model", so)[0]

    def shutdown(self) -> None:
        self.worker = None
