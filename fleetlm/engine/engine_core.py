"""The engine core: schedule -> execute -> update.

It owns the scheduler and the executor and knows nothing about text. ``LLM`` drives it
in-process; a server drives the same object from its own process.

With pipeline parallelism the executor takes up to ``pp`` steps at once: ``step`` first fills
the pipeline with new steps (each holding only requests not already in flight), then waits for
the oldest and returns its outputs. With one stage that is schedule -> execute -> update.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import replace

import torch

from fleetlm.config import CacheConfig, EngineArgs, SchedulerConfig
from fleetlm.core.sched_output import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from fleetlm.core.scheduler import Scheduler
from fleetlm.executor.base import EngineDeadError, StepError, StepHandle, get_executor_class
from fleetlm.metrics.stats import SchedulerStats
from fleetlm.models.loader import LoadedModel
from fleetlm.request import Request

logger = logging.getLogger("fleetlm")


class EngineCore:
    def __init__(self, args: EngineArgs, files: LoadedModel, dtype: torch.dtype, max_model_len: int) -> None:
        self.args = args
        self.executor = get_executor_class(args.executor_backend)(args, files, dtype, max_model_len)
        try:
            num_blocks = self.executor.determine_num_blocks()
            self.executor.initialize_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()  # no worker process outlives a failed start
            raise
        self.cache_config = CacheConfig(args.block_size, num_blocks, args.enable_prefix_caching)
        sched = SchedulerConfig(args.max_num_batched_tokens, args.max_num_seqs, max_model_len,
                                self.executor.max_concurrent_batches, args.scheduling_policy)
        self.scheduler = Scheduler(sched, self.cache_config)
        self.num_failed_steps = 0
        self.in_flight: deque[tuple[SchedulerOutput, StepHandle]] = deque()
        self._deferred: list[EngineCoreOutput] = []  # outputs of steps finished early by _drain
        kv_bytes = self.executor.collective_rpc("kv_bytes_per_token")[0] * self.cache_config.max_tokens
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s); prefix caching %s; attention %s",
            num_blocks, args.block_size, self.cache_config.max_tokens, kv_bytes / 2**30,
            str(dtype).removeprefix("torch."), "on" if args.enable_prefix_caching else "off",
            self.executor.collective_rpc("attention_backend_name")[0],
        )
        if args.world_size > 1:
            logger.info("parallel: tensor %d x pipeline %d ranks (%s executor)", args.tensor_parallel_size,
                        args.pipeline_parallel_size, args.executor_backend)

    def add_request(self, req: Request) -> None:
        self.scheduler.add_request(req)

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.finish_requests(req_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.in_flight or self._deferred)

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler
        while len(self.in_flight) < self.executor.max_concurrent_batches and sched.has_schedulable():
            so = sched.schedule()
            if so.is_empty:
                break
            self.in_flight.append((so, self.executor.execute_model_async(so)))
        if not self.in_flight:
            return self._take_deferred()
        so, handle = self.in_flight.popleft()
        try:
            result = handle.result()
        except EngineDeadError:
            raise
        except Exception as e:
            withdrawn = sched.kv.rollback(so.step_id)  # nothing was written: no prefix hit may point there
            self._drain()
            logger.warning("step failed (%s); retrying its %d request(s) one at a time",
                           _describe(e), len(so.num_scheduled_tokens))
            self.num_failed_steps += 1
            result = self._run_isolated(so, withdrawn)
        except BaseException:
            sched.kv.rollback(so.step_id)
            raise
        sched.kv.commit(so.step_id)
        return sched.update_from_output(so, result) + self._take_deferred()

    def _take_deferred(self) -> list[EngineCoreOutput]:
        out, self._deferred = self._deferred, []
        return out

    def _drain(self) -> None:
        """Finish the steps still in flight before running anything else (isolation runs alone)."""
        pending = list(self.in_flight)
        self.in_flight.clear()
        for so, handle in pending:
            try:
                result = handle.result()
            except EngineDeadError:
                raise
            except Exception as e:  # noqa: BLE001 - handled like any failed step
                withdrawn = self.scheduler.kv.rollback(so.step_id)
                logger.warning("step failed (%s); retrying its requests one at a time", _describe(e))
                result = self._run_isolated(so, withdrawn)
            else:
                self.scheduler.kv.commit(so.step_id)
            self._deferred.extend(self.scheduler.update_from_output(so, result))

    def _run_isolated(self, so: SchedulerOutput, withdrawn: set[int]) -> ModelRunnerOutput:
        """Run a failed step's requests one per step: one bad request fails alone (its error
        is reported, finish_reason "error"); the others get their tokens as usual."""
        merged = ModelRunnerOutput([], [])
        for sub in self.scheduler.split_step(so, withdrawn):
            (rid,) = sub.num_scheduled_tokens
            try:
                out = self.executor.execute_model(sub)
            except EngineDeadError:
                raise
            except Exception as e:
                logger.error("request %s failed: %s", rid, _describe(e))
                merged.errors[rid] = _describe(e)
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


def _describe(e: BaseException) -> str:
    """``Type: message`` of the error where it was raised (a worker's, for a ``StepError``)."""
    return str(e) if isinstance(e, StepError) else f"{type(e).__name__}: {e}"
