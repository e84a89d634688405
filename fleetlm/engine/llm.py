"""The offline API, shaped like vLLM's ``LLM`` so users switch by changing an import."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fleetlm.config import EngineArgs
from fleetlm.core.scheduler import KVCacheCapacityError
from fleetlm.engine.llm_engine import LLMEngine, Prompt
from fleetlm.log import configure_logging
from fleetlm.lora.request import LoRARequest
from fleetlm.models.hub import DEFAULT_MODEL
from fleetlm.models.tokenizer import Tokenizer
from fleetlm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fleetlm.request import Tenancy
from fleetlm.sampling_params import SamplingParams

logger = logging.getLogger("fleetlm")

Conversation = list[dict[str, Any]]


class LLM:
    """``LLM(model, dtype=..., max_model_len=..., enable_prefix_caching=..., kv_cache_memory=...)``.

    Every keyword is an ``EngineArgs`` field; an unknown one raises ``ValueError``.
    """

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs: Any) -> None:
        configure_logging()
        self.engine = LLMEngine(EngineArgs.from_kwargs(model, **kwargs))

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the engine's worker processes (tensor/pipeline parallel); idempotent."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of ``prompts``.

        ``priority``: one integer per prompt, lower runs first (as in vLLM); the waiting queue
        is ordered by (priority, arrival) under both scheduling policies (``fcfs``, ``fair``).
        A prompt dict may carry ``cache_salt`` (``{"prompt": ..., "cache_salt": "s"}`` or with
        ``prompt_token_ids``): its prefix-cache blocks are shared only with prompts of the same
        salt (the same digest ``fleetlm serve`` uses for a request's ``cache_salt``).

        ``lora_request``: one adapter for every prompt, or one (or None) per prompt; an adapter
        not yet loaded is loaded first (the engine needs ``enable_lora=True``).

        Bad input (empty prompt, too long, invalid parameter) raises ``ValueError`` before any
        work starts. A request that can never fit in the KV cache fails alone: its output has
        ``error`` set and ``finish_reason == "error"``; the others run.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = _broadcast(sampling_params, len(prompts))
        tenancies = _tenancies(prompts, priority)
        encoded = [self.engine.tokenize_prompt(p) for p in prompts]
        return self._run(encoded, params, use_tqdm, self._lora_names(lora_request, len(prompts)), tenancies)

    def _lora_names(self, lora: LoRARequest | Sequence[LoRARequest | None] | None, n: int) -> list[str | None]:
        """Load the adapters named (checked first) and return one adapter name (or None) per prompt."""
        if lora is None or isinstance(lora, LoRARequest):
            lora = [lora] * n
        elif len(lora) != n:
            raise ValueError(f"got {len(lora)} lora_request entries for {n} prompts; pass one or one per prompt")
        for lr in lora:
            if lr is not None and not isinstance(lr, LoRARequest):
                raise ValueError(f"lora_request entries must be LoRARequest or None, got {type(lr).__name__}")
            if lr is not None:
                self.engine.add_lora(lr.lora_name, lr.lora_path)
        return [None if lr is None else lr.lora_name for lr in lora]

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if not messages:
            raise ValueError("messages is empty: pass a conversation or a list of conversations")
        convs = [messages] if isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        encoded = []
        for conv in convs:
            text = tok.apply_chat_template(conv)
            encoded.append((text, tok.encode(text, add_special_tokens=False)))
        return self._run(encoded, _broadcast(sampling_params, len(convs)), use_tqdm,
                         self._lora_names(lora_request, len(convs)))

    def _run(self, encoded: list[tuple[str | None, list[int]]], params: list[SamplingParams], use_tqdm: bool,
             loras: list[str | None] | None = None,
             tenancies: list[Tenancy | None] | None = None) -> list[RequestOutput]:
        eng = self.engine
        loras = loras or [None] * len(encoded)
        tenancies = tenancies or [None] * len(encoded)
        ids = [eng.next_request_id() for _ in encoded]
        results: dict[str, RequestOutput] = {}
        accepted = []
        for rid, (text, toks), sp, lora, tenancy in zip(ids, encoded, params, loras, tenancies):
            try:
                eng.make_requests(rid, toks, sp)
            except KVCacheCapacityError as e:
                results[rid] = _failed(rid, text, toks, sp, str(e))
                continue
            accepted.append((rid, text, toks, sp, lora, tenancy))
        bar = _progress(len(accepted)) if use_tqdm and len(accepted) > 1 else None
        try:
            for rid, text, toks, sp, lora, tenancy in accepted:
                eng.add_request(rid, text, toks, sp, lora_name=lora, tenancy=tenancy)
            while eng.has_unfinished_requests():
                for out in eng.step():
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        except BaseException:  # an error or Ctrl-C: nothing of this call stays queued or holds KV
            for rid, *_ in accepted:
                eng.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]


def _broadcast(sp: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if sp is None:
        return [SamplingParams()] * n
    if isinstance(sp, SamplingParams):
        return [sp] * n
    if len(sp) != n:
        raise ValueError(f"got {len(sp)} sampling_params for {n} prompts; pass one or one per prompt")
    return list(sp)


def _tenancies(prompts: Sequence[Prompt], priority: Sequence[int] | None) -> list[Tenancy | None]:
    """Each prompt's priority and cache salt (None: neither given), validated before any work."""
    n = len(prompts)
    if priority is not None:
        if isinstance(priority, (str, bytes)) or not isinstance(priority, Sequence):
            raise ValueError(f"priority must be a list of integers, one per prompt, got {priority!r}")
        if len(priority) != n:
            raise ValueError(f"got {len(priority)} priorities for {n} prompts; pass one per prompt")
        bad = [p for p in priority if not isinstance(p, int) or isinstance(p, bool)]
        if bad:
            raise ValueError(f"priority must be integers, got {bad[0]!r}")
    out: list[Tenancy | None] = []
    for i, p in enumerate(prompts):
        salt = _cache_salt(p)
        prio = 0 if priority is None else priority[i]
        out.append(None if salt is None and prio == 0 else Tenancy(priority=prio, cache_salt=_salt_digest(salt)))
    return out


def _cache_salt(prompt: Prompt) -> str | None:
    if not isinstance(prompt, dict) or "cache_salt" not in prompt:
        return None
    salt = prompt["cache_salt"]
    if not isinstance(salt, str) or not salt:
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    return salt


def _salt_digest(salt: str | None) -> str | None:
    from fleetlm.tenancy.admission import combined_salt

    return combined_salt(None, salt)


def _failed(rid: str, text: str | None, toks: list[int], sp: SamplingParams, why: str) -> RequestOutput:
    import time

    outs = [CompletionOutput(i, "", [], None, None, "error") for i in range(sp.n)]
    return RequestOutput(rid, text, toks, outs, True, RequestMetrics(time.monotonic()), error=why)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="Generating", unit="req", dynamic_ncols=True)
