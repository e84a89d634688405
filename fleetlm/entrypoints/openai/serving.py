"""``/v1/completions`` and ``/v1/chat/completions``: requests in, OpenAI-shaped JSON or SSE out.

One HTTP request may hold several engine requests (batch prompts of ``/v1/completions``); their
choices are numbered ``prompt_index * n + sample_index``. Every engine request is aborted when
the handler ends early (error, timeout, client gone), so its KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fleetlm.engine.async_llm import (
    AsyncLLM,
    EngineDeadError,
    QueueFullError,
    RequestStream,
    RequestTimeoutError,
)
from fleetlm.entrypoints.openai.protocol import (
    MAX_SEQUENCES,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    bad_request,
    renamed,
)
from fleetlm.outputs import RequestOutput
from fleetlm.sampling_params import SamplingParams
from fleetlm.tenancy.admission import CURRENT
from fleetlm.tenancy.gate import QuotaExceeded, TenantGate

logger = logging.getLogger("fleetlm")

# the LoRA adapter the request's ``model`` names (None: the base model); set by the route
ADAPTER: contextvars.ContextVar[str | None] = contextvars.ContextVar("fleetlm_lora_adapter", default=None)


@dataclass
class Prepared:
    """One engine request of an HTTP request."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]


def engine_error(e: BaseException) -> APIError:
    """Map what ``AsyncLLM.generate`` raises to an HTTP error."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QuotaExceeded):
        return APIError(429, str(e), type="rate_limit_error", param=e.limit, code="rate_limit_exceeded",
                        headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineDeadError):
        return APIError(503, f"the engine is not available: {e}", type="service_unavailable", code="engine_dead")
    if isinstance(e, RequestTimeoutError):
        return APIError(504, str(e), type="timeout_error", code="request_timeout")
    if isinstance(e, ValueError):
        return bad_request(str(e))
    logger.exception("request failed")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error")


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.gate = TenantGate(None, None)  # tenants' quotas and cache salts (fleetlm/tenancy)

    # -- prompts ----------------------------------------------------------------------------------
    def completion_prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """(text or None, token ids) per prompt. A flat list of ints is ONE prompt of token ids;
        a list of strings or of token-id lists is a batch."""
        p = req.prompt
        if isinstance(p, str):
            return [(p, self.encode(p))]
        batch = [p] if isinstance(p[0], int) else p
        if len(batch) * req.n > MAX_SEQUENCES:
            raise bad_request(f"{len(batch)} prompts x n={req.n} exceeds {MAX_SEQUENCES} sequences per request",
                              "prompt")
        if isinstance(batch[0], str):
            return [(s, self.encode(s)) for s in batch]
        vocab = self.engine.model_config.vocab_size
        for ids in batch:
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"prompt contains invalid token id(s) {bad[:5]} (vocab size {vocab})", "prompt")
        return [(None, list(ids)) for ids in batch]

    def encode(self, text: str) -> list[int]:
        ids = safe_encode(self.engine.tokenizer, text, "prompt")
        if not ids:
            raise bad_request("the prompt is empty: at least one token is required", "prompt")
        return ids

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        tok = self.engine.tokenizer
        text = render_chat(tok, req.messages)
        return text, safe_encode(tok, text, "messages", add_special_tokens=False)

    def sampling_params(self, req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        """The request's ``SamplingParams``, checked against the model too: stop token ids in
        the vocabulary, and ``min_tokens`` not banning every token (400 naming the field)."""
        params = req.to_sampling_params()
        vocab = self.engine.model_config.vocab_size
        for i, t in enumerate(req.stop_token_ids or ()):
            if t >= vocab:
                raise bad_request(f"stop_token_ids[{i}] = {t} is not a token id (vocab size {vocab})",
                                  f"stop_token_ids[{i}]")
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.engine.tokenizer.eos_token_ids))
        if params.min_tokens > 0 and len(banned) >= vocab:
            raise bad_request("min_tokens cannot be met: stop_token_ids and EOS cover every token, so none "
                              "could be sampled before min_tokens", "min_tokens")
        return params

    # -- running ----------------------------------------------------------------------------------
    def start(self, prepared: list[Prepared], params: SamplingParams, stream: bool,
              arrival: float, aliases: dict[str, str] | None = None,
              kv_transfer_params: dict | None = None) -> list[RequestStream]:
        """Admit every engine request of one HTTP request, or none (errors map to HTTP)."""
        streams: list[RequestStream] = []
        ctx, by_id = CURRENT.get(), {p.request_id: p for p in prepared}

        def add(rid: str, tenancy) -> RequestStream:
            p = by_id[rid]
            kv = {} if kv_transfer_params is None else {"kv_transfer_params": kv_transfer_params}  # fleetlm/disagg
            return self.engine.add_request(rid, p.prompt, p.prompt_ids, params, stream=stream, arrival_time=arrival,
                                           tenancy=tenancy, lora_name=ADAPTER.get(), **kv)

        try:
            self.engine.check_queue_bounds(params.n * len(prepared), params.n * sum(len(p.prompt_ids) for p in prepared))
            self.gate.check_size(ctx, sum(len(p.prompt_ids) for p in prepared), params.n * len(prepared))
            streams = self.gate.start(ctx, [(p.request_id, p.prompt_ids) for p in prepared], params.n, stream, add)
        except BaseException as e:
            close_all(streams)
            if isinstance(e, ValueError) and not isinstance(e, APIError):
                raise admission_error(str(e), aliases or {}) from None
            raise
        return streams


def admission_error(message: str, aliases: dict[str, str]) -> APIError:
    """A request the engine refused at admission, as a 400 naming the field the client sent."""
    if "cannot be sent to the engine" in message:  # defence in depth: the protocol checks first
        return bad_request("the request holds a value the engine cannot take (an integer beyond 64 bits, "
                           "or text that is not valid Unicode)")
    return renamed(bad_request(message, "max_tokens" if "max_tokens" in message else "prompt"), aliases)


def render_chat(tok, messages: list[ChatMessage], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> str:
    """The chat template applied to ``messages`` (400 if it refuses them).

    A message's ``name`` is passed to the template. It is never silently dropped: for each role
    with a named message, the conversation is rendered again without that role's names, and if
    the text is the same (the template ignores them) the request is refused naming the field.
    At most five renders, whatever the number of messages."""
    def render(drop_names_of: str | None) -> str:
        msgs = [m.as_dict(with_name=m.role != drop_names_of) for m in messages]
        return tok.apply_chat_template(msgs, add_generation_prompt, **({"tools": tools} if tools else {}))

    try:
        text = render(None)
        first_named = {m.role: i for i, m in reversed(list(enumerate(messages))) if m.name is not None}
        for role, i in first_named.items():
            if render(role) == text:
                raise bad_request(f"messages[{i}].name is not supported: this model's chat template does not "
                                  f"use names on {role} messages", f"messages[{i}].name")
    except ValueError as e:
        raise bad_request(f"messages: {e}", "messages") from None
    return text


async def collect(streams: list[RequestStream]) -> list[RequestOutput]:
    """The final output of each stream (non-streaming requests yield exactly one)."""
    try:
        return [[o async for o in rs][-1] for rs in streams]
    finally:
        close_all(streams)


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for o in streams[0]:
            yield 0, o
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, rs: RequestStream) -> None:
        try:
            async for o in rs:
                await queue.put((i, o))
        except BaseException as e:
            await queue.put((i, e))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, rs)) for i, rs in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def close_all(streams: list[RequestStream]) -> None:
    for rs in streams:
        rs.close()


def safe_encode(tok, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    """Tokenize, turning text the tokenizer cannot take (e.g. lone surrogates) into a 400."""
    try:
        return tok.encode(text, add_special_tokens=add_special_tokens)
    except (TypeError, UnicodeError) as e:
        raise bad_request(f"{param} is not valid text: {type(e).__name__}", param) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_error(out: RequestOutput) -> None:
    if out.error is not None or any(c.finish_reason == "error" for c in out.outputs):
        raise APIError(500, f"the request failed in the engine: {out.error}", type="internal_error",
                       code="engine_error")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj) -> bytes:
    # ASCII-escaped: no raw U+2028/U+0085 that line-splitting clients would break on
    return f"data: {json.dumps(obj)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


async def run_cancellable(coro, receive) -> object:
    """Await ``coro`` unless the client disconnects first (then cancel it: its ``finally`` aborts
    the engine requests). Returns the result, or raises ``ClientGone``."""
    task = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise ClientGone()
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()


class ClientGone(Exception):
    pass


async def wait_disconnect(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


def now_s() -> int:
    return int(time.time())
