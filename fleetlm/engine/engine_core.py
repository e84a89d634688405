"""The engine core: schedule -> execute -> update, one step at a time.

It owns the scheduler and the executor and knows nothing about text. ``LLM`` drives it
in-process; a server drives the same object from its own process.
"""

from __future__ import annotations

import logging

import torch

from fleetlm.config import CacheConfig, EngineArgs, SchedulerConfig
from fleetlm.core.sched_output import EngineCoreOutput
from fleetlm.core.scheduler import Scheduler
from fleetlm.executor.uniproc import UniProcExecutor
from fleetlm.models.loader import LoadedModel
from fleetlm.request import Request

logger = logging.getLogger("fleetlm")


class EngineCore:
    def __init__(self, args: EngineArgs, files: LoadedModel, dtype: torch.dtype, max_model_len: int) -> None:
        self.args = args
        self.executor = UniProcExecutor(args, files, dtype, max_model_len)
        num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_cache(num_blocks)
        self.cache_config = CacheConfig(args.block_size, num_blocks, args.enable_prefix_caching)
        sched = SchedulerConfig(args.max_num_batched_tokens, args.max_num_seqs, max_model_len)
        self.scheduler = Scheduler(sched, self.cache_config)
        kv_bytes = self.executor.collective_rpc("kv_bytes_per_token")[0] * self.cache_config.max_tokens
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s); prefix caching %s; attention %s",
            num_blocks, args.block_size, self.cache_config.max_tokens, kv_bytes / 2**30,
            str(dtype).removeprefix("torch."), "on" if args.enable_prefix_caching else "off",
            self.executor.worker.runner.backend.name,
        )

    def add_request(self, req: Request) -> None:
        self.scheduler.add_request(req)

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.finish_requests(req_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        if not self.scheduler.has_unfinished_requests():
            return []
        so = self.scheduler.schedule()
        try:
            result = self.executor.execute_model(so)
        except BaseException:
            self.scheduler.kv.rollback()  # nothing was written: no prefix hit may point there
            raise
        self.scheduler.kv.commit()
        return self.scheduler.update_from_output(so, result)

    def shutdown(self) -> None:
        self.executor.shutdown()
