"""The engine core: schedule -> execute -> update, one step at a time.

It owns the scheduler and the executor and knows nothing about text. ``LLM`` drives it
in-process; a server drives the same object from its own process.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from fleetlm.config import CacheConfig, EngineArgs, SchedulerConfig
from fleetlm.core.sched_output import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from fleetlm.core.scheduler import Scheduler
from fleetlm.executor.uniproc import UniProcExecutor
from fleetlm.metrics.stats import SchedulerStats
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
        self.num_failed_steps = 0
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
        except Exception as e:
            self.scheduler.kv.rollback()  # nothing was written: no prefix hit may point there
            if len(so.num_scheduled_tokens) == 0:
                raise
            logger.warning("step failed (%s: %s); retrying its %d request(s) one at a time",
                           type(e).__name__, e, len(so.num_scheduled_tokens))
            self.num_failed_steps += 1
            result = self._run_isolated(so)
        except BaseException:
            self.scheduler.kv.rollback()
            raise
        self.scheduler.kv.commit()
        return self.scheduler.update_from_output(so, result)

    def _run_isolated(self, so: SchedulerOutput) -> ModelRunnerOutput:
        """Run a failed step's requests one per step: one bad request fails alone (its error
        is reported, finish_reason "error"); the others get their tokens as usual."""
        merged = ModelRunnerOutput([], [])
        for sub in self.scheduler.split_step(so):
            (rid,) = sub.num_scheduled_tokens
            try:
                out = self.executor.execute_model(sub)
            except Exception as e:
                logger.error("request %s failed: %s: %s", rid, type(e).__name__, e)
                merged.errors[rid] = f"{type(e).__name__}: {e}"
                continue
            merged.req_ids += out.req_ids
            merged.sampled_token_ids += out.sampled_token_ids
            merged.logprobs.update(out.logprobs)
            merged.prompt_logprobs.update(out.prompt_logprobs)
        return merged

    def stats(self) -> SchedulerStats:
        return replace(self.scheduler.stats(), num_failed_steps=self.num_failed_steps)

    def shutdown(self) -> None:
        self.executor.shutdown()
