"""``/v1/completions`` and ``/v1/chat/completions``: requests in, OpenAI-shaped JSON or SSE out.

One HTTP request may hold several engine requests (batch prompts of ``/v1/completions``); their
choices are numbered ``prompt_index * n + sample_index``. Every engine request is aborted when
the handler ends early (error, timeout, client gone), so its KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fleetlm.core.sched_output import PositionLogprobs
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
    CompletionRequest,
    bad_request,
)
from fleetlm.outputs import RequestOutput
from fleetlm.sampling_params import SamplingParams

logger = logging.getLogger("fleetlm")


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

    # -- prompts ----------------------------------------------------------------------------------
    def completion_prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        p = req.prompt
        if isinstance(p, str):
            return [(p, self.encode(p))]
        if len(p) * req.n > MAX_SEQUENCES:
            raise bad_request(f"{len(p)} prompts x n={req.n} exceeds {MAX_SEQUENCES} sequences per request", "prompt")
        if isinstance(p[0], str):
            return [(s, self.encode(s)) for s in p]
        batch = [p] if isinstance(p[0], int) else p
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
        try:
            text = tok.apply_chat_template([m.as_dict() for m in req.messages])
        except ValueError as e:
            raise bad_request(f"messages: {e}", "messages") from None
        return text, safe_encode(tok, text, "messages", add_special_tokens=False)

    # -- running ----------------------------------------------------------------------------------
    def start(self, prepared: list[Prepared], params: SamplingParams, stream: bool,
              arrival: float) -> list[RequestStream]:
        """Admit every engine request of one HTTP request, or none (errors map to HTTP)."""
        streams: list[RequestStream] = []
        try:
            self.engine.check_queue_bounds(params.n * len(prepared), params.n * sum(len(p.prompt_ids) for p in prepared))
            for p in prepared:
                streams.append(self.engine.add_request(p.request_id, p.prompt, p.prompt_ids, params,
                                                       stream=stream, arrival_time=arrival))
        except BaseException as e:
            close_all(streams)
            if isinstance(e, ValueError) and not isinstance(e, APIError):
                raise bad_request(str(e), "max_tokens" if "max_tokens" in str(e) else "prompt") from None
            raise
        return streams


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


# -- logprobs -------------------------------------------------------------------------------------
def _ranked(pos: PositionLogprobs, token: int, k: int):
    sampled = pos[token]
    top = sorted((lp.rank, t, lp) for t, lp in pos.items() if lp.rank <= k)
    return sampled, [(t, lp) for _, t, lp in top[:k]]


def chat_logprobs(token_ids: list[int], lps: list[PositionLogprobs] | None, k: int) -> dict | None:
    if lps is None:
        return None
    content = []
    for tok, pos in zip(token_ids, lps):
        sampled, top = _ranked(pos, tok, k)
        text = sampled.decoded_token or ""
        content.append({
            "token": text, "logprob": sampled.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": lp.decoded_token or "", "logprob": lp.logprob,
                              "bytes": list((lp.decoded_token or "").encode())} for _, lp in top],
        })
    return {"content": content}


def completion_logprobs(token_ids: list[int], lps: list[PositionLogprobs | None], k: int,
                        text_offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, pos in zip(token_ids, lps):
        if pos is None:  # first prompt token: nothing predicts it
            out["tokens"].append(None)
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(text_offset)
            continue
        sampled, top = _ranked(pos, tok, k)
        text = sampled.decoded_token or ""
        out["tokens"].append(text)
        out["token_logprobs"].append(sampled.logprob)
        out["top_logprobs"].append({lp.decoded_token or "": lp.logprob for _, lp in top})
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out


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
