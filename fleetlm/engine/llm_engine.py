"""In-process engine: tokenization and output processing around one ``EngineCore``."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace
from typing import Any

import torch

from fleetlm.config import EngineArgs, parse_dtype
from fleetlm.distributed.parallel_state import check_parallel_fits
from fleetlm.engine.engine_core import EngineCore
from fleetlm.engine.output_processor import OutputProcessor
from fleetlm.models.hub import resolve_model
from fleetlm.models.loader import LoadedModel, load_model_files
from fleetlm.outputs import RequestOutput
from fleetlm.request import Request
from fleetlm.sampling_params import SamplingParams

logger = logging.getLogger("fleetlm")

MAX_DEFAULT_MODEL_LEN = 8192

Prompt = str | dict[str, Any]


def resolve_max_model_len(args: EngineArgs, model_max: int) -> int:
    if args.max_model_len is None:
        return min(model_max, MAX_DEFAULT_MODEL_LEN)
    if args.max_model_len > model_max:
        raise ValueError(f"max_model_len ({args.max_model_len}) exceeds the model's context length ({model_max})")
    return args.max_model_len


def load_engine_parts(args: EngineArgs) -> tuple[LoadedModel, torch.dtype, int]:
    """Model files (weights streamed lazily), compute dtype and max_model_len for ``args``."""
    dtype = parse_dtype(args.dtype, args.resolved_device)
    files = load_model_files(resolve_model(args.model), dtype)
    c = files.config
    check_parallel_fits(c.num_heads, c.num_kv_heads, c.num_layers, args.tensor_parallel_size,
                        args.pipeline_parallel_size)
    if c.intermediate_size % args.tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {args.tensor_parallel_size} does not divide the model's "
                         f"intermediate size ({c.intermediate_size})")
    return files, dtype, resolve_max_model_len(args, c.max_position_embeddings)


def fan_out(request_id: str, prompt_ids: list[int], params: SamplingParams, eos_token_ids: tuple[int, ...],
            max_model_len: int) -> list[Request]:
    """One core request per sample (ids ``rid#i`` when n > 1); ``max_tokens=None`` fills the context."""
    if params.max_tokens is None:
        params = replace(params, max_tokens=max(1, max_model_len - len(prompt_ids)))
    return [
        Request(request_id if params.n == 1 else f"{request_id}#{i}", prompt_ids, params.for_sample(i),
                eos_token_ids=eos_token_ids)
        for i in range(params.n)
    ]


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        files, self.dtype, self.max_model_len = load_engine_parts(args)
        self.model_config = files.config
        self.tokenizer = files.tokenizer
        self.core = EngineCore(args, files, self.dtype, self.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids contains invalid token id(s) {bad[:5]} (vocab size {self.model_config.vocab_size})")
            return prompt.get("prompt"), ids
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids' or 'prompt', got {type(prompt).__name__}")

    def make_requests(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> list[Request]:
        """One core request per sample; validated (ValueError) before anything is queued."""
        reqs = fan_out(request_id, prompt_ids, params, self.tokenizer.eos_token_ids, self.max_model_len)
        self.core.scheduler.check_request(reqs[0])
        return reqs

    def add_request(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> None:
        reqs = self.make_requests(request_id, prompt_ids, params)
        self.output_processor.add(request_id, prompt, prompt_ids, params, [r.request_id for r in reqs], time.monotonic())
        for r in reqs:
            self.core.add_request(r)

    def abort_request(self, request_id: str) -> None:
        """Drop a request everywhere; its KV blocks go back to the pool."""
        self.core.abort_requests(self.output_processor.abort(request_id))

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def step(self) -> list[RequestOutput]:
        outputs = self.core.step()
        done, to_abort = self.output_processor.process(outputs)
        if to_abort:
            self.core.abort_requests(to_abort)
        return done

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or self.output_processor.has_unfinished()
