"""In-process engine: tokenization and output processing around one engine core, reached
through ``InprocClient`` (the server reaches its core through ``AsyncMPClient``; both validate
requests with the same ``InputProcessor``)."""

from __future__ import annotations

import itertools
import logging
import time

from fleetlm.config import EngineArgs
from fleetlm.engine.core_client import InprocClient
from fleetlm.engine.output_processor import OutputProcessor
from fleetlm.engine.processor import InputProcessor, Prompt, load_engine_parts
from fleetlm.lora.registry import LoRARegistry
from fleetlm.outputs import RequestOutput
from fleetlm.request import Request, Tenancy
from fleetlm.sampling_params import SamplingParams

logger = logging.getLogger("fleetlm")

__all__ = ["LLMEngine", "Prompt"]


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        files, self.dtype, self.max_model_len = load_engine_parts(args)
        self.model_config = files.config
        self.tokenizer = files.tokenizer
        self.processor = InputProcessor(self.tokenizer, self.model_config, self.max_model_len)
        if args.data_parallel_size > 1:  # N core processes (engine/dp_sync.py)
            from fleetlm.engine.dp_sync import DPSyncClient

            self.client = DPSyncClient(args)
        else:
            self.client = InprocClient(args, files, self.dtype, self.max_model_len)
        self.processor.cache_config = self.client.cache_config
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self.loras = LoRARegistry(args.enable_lora, args.max_loras, self.model_config, args.lora_modules)

    @property
    def core(self):
        """The in-process ``EngineCore`` (tests and benchmarks look inside it)."""
        return self.client.core

    def tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        return self.processor.tokenize_prompt(prompt)

    def make_requests(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> list[Request]:
        """One core request per sample; validated (ValueError) before anything is queued."""
        return self.processor.make_requests(request_id, prompt_ids, params)

    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                    lora_name: str | None = None, tenancy: Tenancy | None = None) -> None:
        self.loras.check_request(lora_name)
        reqs = self.make_requests(request_id, prompt_ids, params)
        for r in reqs:
            r.lora_name = lora_name
            if tenancy is not None:  # priority and cache salt (LLM.generate)
                r.tenancy = tenancy
        self.output_processor.add(request_id, prompt, prompt_ids, params, [r.request_id for r in reqs], time.monotonic())
        self.client.add_requests(reqs)

    def add_lora(self, name: str, path: str) -> None:
        """Load a LoRA adapter (checked here first: ``ValueError`` naming what is wrong)."""
        if self.loras.prepare_add(name, path):
            self.client.add_lora(name, path)
            self.loras.added(name, path)

    def remove_lora(self, name: str) -> None:
        self.loras.remove(name)
        self.client.remove_lora(name)

    def abort_request(self, request_id: str) -> None:
        """Drop a request everywhere; its KV blocks go back to the pool."""
        self.client.abort_requests(self.output_processor.abort(request_id))

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def step(self) -> list[RequestOutput]:
        outputs = self.client.step()
        done, to_abort = self.output_processor.process(outputs)
        if to_abort:
            self.client.abort_requests(to_abort)
        return done

    def has_unfinished_requests(self) -> bool:
        return self.client.has_unfinished_requests() or self.output_processor.has_unfinished()

    def shutdown(self) -> None:
        self.client.shutdown()
