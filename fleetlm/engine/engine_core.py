"""The engine core: schedule -> execute -> update.

It owns the scheduler and the executor and knows nothing about text. ``LLM`` drives it
in-process; a server drives the same object from its own process.

With pipeline parallelism the executor takes up to ``pp`` steps at once: ``step`` first fills
the pipeline with new steps (each holding only requests not already in flight), then waits for
the oldest and returns its outputs. With one stage that is schedule -> execute -> update.

Structured requests wait for their grammar outside the scheduler (``structured/manager.py``):
``step`` first admits those whose grammar is compiled, attaches the grammar bitmask of each
step's sampling rows to its ``SchedulerOutput``, and advances the matchers with the tokens
each step produced.
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
from fleetlm.request import Request, RequestStatus
from fleetlm.structured.manager import StructuredOutputManager

logger = logging.getLogger("fleetlm")

GRAMMAR_IDLE_WAIT_S = 0.005  # an engine with only grammars compiling waits this long per step


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
        if args.speculative_config is not None:
            from fleetlm.spec_decode.scheduling import SpecScheduler

            cost = self.executor.collective_rpc("spec_draft_cost")[0]
            self.scheduler.spec = SpecScheduler(args.speculative_config, cost)
        self.num_failed_steps = 0
        self.in_flight: deque[tuple[SchedulerOutput, StepHandle]] = deque()
        self._deferred: list[EngineCoreOutput] = []  # outputs of steps finished early by _drain
        self.tokenizer, self.vocab_size = files.tokenizer, files.config.vocab_size
        self.loras: dict[str, str] = dict(args.lora_modules)  # name -> path, loaded by every worker at start
        self._unloading: set[str] = set()
        self._structured: StructuredOutputManager | None = None  # built on the first structured request
        self.kv_connector = None  # disaggregated prefill/decode (fleetlm/disagg/connector.py)
        if args.kv_transfer_config is not None:
            from fleetlm.disagg.connector import KVConnector

            self.kv_connector = KVConnector(args.kv_transfer_config, self)
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

    @property
    def structured(self) -> StructuredOutputManager:
        if self._structured is None:
            self._structured = StructuredOutputManager(self.tokenizer, self.vocab_size)
        return self._structured

    # -- LoRA adapters (fleetlm/lora) ---------------------------------------------------------------
    def add_lora(self, name: str, path: str) -> None:
        """Load an adapter on every rank. The same name and path again is a no-op."""
        if not self.args.enable_lora:
            raise ValueError("LoRA adapters are not enabled: start the engine with enable_lora=True (--enable-lora)")
        if self.loras.get(name) == path and name not in self._unloading:
            return
        if name in self.loras:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded from {self.loras[name]!r}")
        self.executor.collective_rpc("add_lora", name, path)
        self.loras[name] = path

    def remove_lora(self, name: str) -> None:
        """Unload an adapter: new requests may no longer name it; requests using it finish first."""
        if name not in self.loras or name in self._unloading:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded")
        self._unloading.add(name)
        self._unload_unused()

    def _unload_unused(self) -> None:
        in_use = {r.lora_name for r in self.scheduler.requests.values()}
        if self._structured is not None:
            in_use |= {r.lora_name for r, _ in self._structured.waiting.values()}
        for name in sorted(self._unloading - in_use):
            self.executor.collective_rpc("remove_lora", name)
            self._unloading.discard(name)
            del self.loras[name]

    def add_request(self, req: Request) -> None:
        if req.lora_name is not None and (req.lora_name not in self.loras or req.lora_name in self._unloading):
            raise ValueError(f"request {req.request_id}: no LoRA adapter named {req.lora_name!r} is loaded")
        if req.kv_transfer_params is not None:
            if self.kv_connector is None:
                raise ValueError("kv_transfer_params: this engine has no kv_transfer_config (not a K/V producer "
                                 "or consumer)")
            if req.sampling_params.structured_outputs is not None:
                raise ValueError("kv_transfer_params cannot be combined with structured outputs yet")
            self.kv_connector.add_request(req)
            return
        if req.sampling_params.structured_outputs is None:
            self.scheduler.add_request(req)
            return
        self.scheduler.check_request(req)
        if req.request_id in self.scheduler.requests or req.request_id in self.structured:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.structured.add(req)  # to the scheduler once its grammar is compiled

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.finish_requests(req_ids)
        if self._structured is not None:
            self._structured.remove(req_ids)

    def has_unfinished_requests(self) -> bool:
        waiting_grammar = self._structured is not None and bool(self._structured.waiting)
        waiting_kv = self.kv_connector is not None and self.kv_connector.has_pending()
        return (self.scheduler.has_unfinished_requests() or bool(self.in_flight or self._deferred) or waiting_grammar
                or waiting_kv)

    def _admit_compiled(self) -> None:
        """Move requests whose grammar is ready into the scheduler; fail those whose is not."""
        if self._structured is None or not self._structured.waiting:
            return
        if not (self.scheduler.has_unfinished_requests() or self.in_flight):
            self._structured.wait(GRAMMAR_IDLE_WAIT_S)  # nothing else to do: do not spin
        ready, failed = self._structured.take_ready()
        for req in ready:
            self.scheduler.add_request(req)
        for req, why in failed:
            logger.warning("request %s: %s", req.request_id, why)
            self._deferred.append(EngineCoreOutput(req.request_id, [], "error", error=why))

    def _schedule(self) -> SchedulerOutput:
        so = self.scheduler.schedule()
        if self._structured is not None and self._structured.matchers and not so.is_empty:
            drafts = {c.req_id: c.spec_token_ids for c in so.scheduled_cached_reqs if c.spec_token_ids}
            grammar = self._structured.bitmask(so.num_scheduled_tokens, self.scheduler.requests, drafts)
            if grammar is not None:
                so = replace(so, grammar=grammar)
        return so

    def _update(self, so: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs = self.scheduler.update_from_output(so, result)
        if self._structured is None or not self._structured.matchers:
            return outputs
        for out in outputs:
            if out.new_token_ids and not self._structured.accept(out.request_id, out.new_token_ids):
                if not out.finished:
                    self.scheduler.finish_requests([out.request_id], RequestStatus.FINISHED_ERROR)
                    out.finish_reason, out.error = "error", "the grammar refused a sampled token"
            if out.finished:
                self._structured.remove([out.request_id])
        return outputs

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler
        if self._unloading:
            self._unload_unused()
        self._admit_compiled()
        if self.kv_connector is not None:
            self.kv_connector.poll()
        while len(self.in_flight) < self.executor.max_concurrent_batches and sched.has_schedulable():
            so = self._schedule()
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
        outputs = self._update(so, result)
        if self.kv_connector is not None:
            self.kv_connector.fix_outputs(outputs)
        return outputs + self._take_deferred()

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
            self._deferred.extend(self._update(so, result))

    def _run_isolated(self, so: SchedulerOutput, withdrawn: set[int]) -> ModelRunnerOutput:
        """Run a failed step's requests one per step: one bad request fails alone (its error
        is reported, finish_reason "error"); the others get their tokens as usual."""
        merged = ModelRunnerOutput([], [])
        for sub in self.scheduler.split_step(so, withdrawn):
            (rid,) = sub.num_scheduled_tokens
            if so.grammar is not None:
                sub = replace(sub, grammar=so.grammar.subset({rid}))
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
        from fleetlm.moe.stats import executor_report

        s = replace(self.scheduler.stats(), num_failed_steps=self.num_failed_steps,
                    moe=executor_report(self.executor))
        if self._structured is not None and self._structured.waiting:  # queued behind their grammar
            s = replace(s, num_waiting=s.num_waiting + len(self._structured.waiting))
        return s

    def shutdown(self) -> None:
        if self.kv_connector is not None:
            self.kv_connector.close()
            self.kv_connector = None
        self.executor.shutdown()
        if self._structured is not None:
            self._structured.shutdown()


def _describe(e: BaseException) -> str:
    """``Type: message`` of the error where it was raised (a worker's, for a ``StepError``)."""
    return str(e) if isinstance(e, StepError) else f"{type(e).__name__}: {e}"
