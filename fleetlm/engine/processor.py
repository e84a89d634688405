"""What both doors (offline ``LLM`` and the server's ``AsyncLLM``) do to a request before it
reaches an engine core, so they accept and refuse exactly the same things.

- ``load_engine_parts``: model files (weights streamed lazily), compute dtype, ``max_model_len``,
  with the parallel layout checked against the model;
- ``InputProcessor``: prompt -> token ids (text, token ids in the vocabulary, or both), and a
  request -> one core ``Request`` per sample, checked against the engine's limits.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fleetlm.config import CacheConfig, EngineArgs, parse_dtype
from fleetlm.core.scheduler import check_request_fits
from fleetlm.distributed.parallel_state import check_parallel_fits
from fleetlm.models.hub import resolve_model
from fleetlm.models.loader import LoadedModel, ModelConfig, load_model_files
from fleetlm.models.tokenizer import Tokenizer
from fleetlm.request import Request
from fleetlm.sampling_params import SamplingParams
from fleetlm.structured.backend import check_cached as check_structured

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
    files = load_model_files(resolve_model(args.model), dtype, quantization=args.quantization)
    c = files.config
    check_parallel_fits(c.num_heads, c.num_kv_heads, c.num_layers, args.tensor_parallel_size,
                        args.pipeline_parallel_size)
    args.stage_layers(c.num_layers)  # a given partition must fit the model
    from fleetlm.moe.config import runtime_config

    # the MoE engine arguments ride in the config every rank builds from (checked against the model)
    files.config = c = replace(c, moe=runtime_config(c.moe, args))
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


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, model_config: ModelConfig, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.cache_config: CacheConfig | None = None  # set once the core has sized its KV cache

    def tokenize_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
            self.check_token_ids(ids)
            return prompt.get("prompt"), ids
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids' or 'prompt', got {type(prompt).__name__}")

    def check_token_ids(self, ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids contains invalid token id(s) {bad[:5]} (vocab size {vocab})")

    def make_requests(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> list[Request]:
        """One core request per sample; ``ValueError`` (``KVCacheCapacityError`` for the KV
        limit) before anything is queued if it can never run on this engine."""
        if params.structured_outputs is not None:
            check_structured(params.structured_outputs)  # a bad schema is refused here, not in the core
        reqs = fan_out(request_id, prompt_ids, params, self.tokenizer.eos_token_ids, self.max_model_len)
        check_request_fits(len(prompt_ids), reqs[0].max_tokens, self.max_model_len, self.cache_config)
        return reqs
