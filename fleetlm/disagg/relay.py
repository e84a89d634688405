"""Bodies and responses of ``fleetlm router --pd`` (``fleetlm/router/pd.py``): what a request
may ask for, and how the prefill's first token and the decode worker's answer become one
completion (joined JSON, or the first token's SSE chunk followed by the decode worker's stream).
``chat`` selects the ``/v1/chat/completions`` shapes (``message`` / ``delta`` instead of ``text``)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from fleetlm.router.proxy import SSE_DONE, pipe_sse, sse_error

if TYPE_CHECKING:
    from fleetlm.router.pd import PDWorker


def max_tokens(body: dict, chat: bool) -> int | None:
    """The request's output limit (chat: ``max_completion_tokens`` wins; None = no limit)."""
    if chat:
        mct = body.get("max_completion_tokens")
        return mct if mct is not None else body.get("max_tokens")
    return body.get("max_tokens", 16)


def check_body(body, chat: bool = False) -> tuple[str, str] | None:
    if not isinstance(body, dict):
        return "body", "the body must be a JSON object"
    if "kv_transfer_params" in body:
        return "kv_transfer_params", "kv_transfer_params is set by the P/D router itself"
    if body.get("n", 1) != 1:
        return "n", "the P/D router serves n = 1"
    if chat:
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return "messages", "the P/D router needs a non-empty list of messages"
        if body.get("tools"):
            return "tools", "tools are not supported by the P/D router yet"
    else:
        p = body.get("prompt")
        if not (isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p))):
            return "prompt", "the P/D router serves one prompt (a string or a list of token ids)"
        if body.get("echo"):
            return "echo", "echo is not supported by the P/D router"
    mt = max_tokens(body, chat)
    if (mt is not None or not chat) and (not isinstance(mt, int) or mt < 1):
        return "max_tokens", "the P/D router needs max_tokens >= 1"
    return None


def prefill_body(body: dict) -> dict:
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "max_completion_tokens")}
    return out | {"max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}


def decode_body(body: dict, chat: bool, handle: dict) -> dict:
    mt = max_tokens(body, chat)
    out = {k: v for k, v in body.items() if k != "max_completion_tokens"}
    return out | {"max_tokens": None if mt is None else mt - 1, "kv_transfer_params": handle}


def _first_choice(c: dict, chat: bool) -> dict:
    if chat:
        delta = {"role": "assistant", "content": c["message"]["content"]}
        return {"index": 0, "delta": delta, "logprobs": c.get("logprobs"), "finish_reason": None}
    return {"index": 0, "text": c["text"], "logprobs": c.get("logprobs"), "finish_reason": None, "stop_reason": None}


def first_chunk(pre: dict, chat: bool = False, final: bool = False) -> bytes:
    """The prefill's token as the stream's first event (``final``: with its finish reason)."""
    c = pre["choices"][0]
    choice = _first_choice(c, chat)
    if final:
        choice.update(finish_reason=c["finish_reason"], stop_reason=c.get("stop_reason"))
    chunk = {"id": pre["id"], "object": "chat.completion.chunk" if chat else "text_completion",
             "created": pre["created"], "model": pre["model"], "choices": [choice]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def only_prefill(request: web.Request, body: dict, pre: dict, chat: bool = False) -> web.StreamResponse:
    """Nothing to decode (EOS first, or max_tokens 1): the prefill's answer is the answer."""
    pre = {k: v for k, v in pre.items() if k != "kv_transfer_params"}
    if not body.get("stream"):
        return web.json_response(pre)
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    await out.write(first_chunk(pre, chat, final=True) + SSE_DONE)
    return out


async def relay_stream(request: web.Request, resp: aiohttp.ClientResponse, pre: dict, w: PDWorker,
                       chat: bool = False) -> web.StreamResponse:
    """The first token's event, then the decode worker's stream (a cut stream ends with an
    error event; a client that left stops the copy, which drops the upstream request)."""
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    await out.write(first_chunk(pre, chat))
    piped = await pipe_sse(resp, out)
    if piped.client_gone:
        raise ClientGone(out)
    if not piped.complete:
        w.failures += 1
        await out.write(sse_error(f"decode worker {w.url} failed mid-stream: {piped.error or 'stream cut'}",
                                  "decode_worker_failed"))
    return out


class ClientGone(Exception):
    """The client left while its answer was being streamed (``response``: the stream begun)."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the client left mid-stream")
        self.response = response


def join_responses(pre: dict, dec: dict, chat: bool = False) -> dict:
    """One completion from the prefill's first token and the decode's rest."""
    c0, c1 = pre["choices"][0], dec["choices"][0]
    lp = None
    if c0.get("logprobs") and c1.get("logprobs"):
        lp = {k: c0["logprobs"][k] + c1["logprobs"][k] for k in c0["logprobs"] if k != "text_offset"}
    if chat:
        text = {"message": {**c1["message"], "content": c0["message"]["content"] + c1["message"]["content"]}}
    else:
        text = {"text": c0["text"] + c1["text"]}
    n_gen = 1 + dec["usage"]["completion_tokens"]
    n_prompt = pre["usage"]["prompt_tokens"]
    return {**dec, "id": pre["id"], "choices": [{**c1, **text, "logprobs": lp}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}
