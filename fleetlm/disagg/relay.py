"""Bodies and responses of ``fleetlm router --pd`` (``fleetlm/router/pd.py``): what a request
may ask for, and how the prefill's first token and the decode worker's answer become one
completion (joined JSON, or the first token's SSE chunk followed by the decode worker's stream)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from fleetlm.router.pd import PDWorker

SSE_DONE = b"data: [DONE]\n\n"


def check_body(body) -> tuple[str, str] | None:
    if not isinstance(body, dict):
        return "body", "the body must be a JSON object"
    if "kv_transfer_params" in body:
        return "kv_transfer_params", "kv_transfer_params is set by the P/D router itself"
    if body.get("n", 1) != 1:
        return "n", "the P/D router serves n = 1"
    p = body.get("prompt")
    if not (isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p))):
        return "prompt", "the P/D router serves one prompt (a string or a list of token ids)"
    mt = body.get("max_tokens", 16)
    if not isinstance(mt, int) or mt < 1:
        return "max_tokens", "the P/D router needs max_tokens >= 1"
    if body.get("echo"):
        return "echo", "echo is not supported by the P/D router"
    return None


def first_chunk(pre: dict) -> bytes:
    c = pre["choices"][0]
    chunk = {"id": pre["id"], "object": "text_completion", "created": pre["created"], "model": pre["model"],
             "choices": [{"index": 0, "text": c["text"], "logprobs": c.get("logprobs"), "finish_reason": None,
                          "stop_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def only_prefill(request: web.Request, body: dict, pre: dict) -> web.StreamResponse:
    """Nothing to decode (EOS first, or max_tokens 1): the prefill's answer is the answer."""
    pre = {k: v for k, v in pre.items() if k != "kv_transfer_params"}
    if not body.get("stream"):
        return web.json_response(pre)
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    c = pre["choices"][0]
    last = {**json.loads(first_chunk(pre)[6:]), "choices": [{**c}]}
    await out.write(b"data: " + json.dumps(last).encode() + b"\n\n" + SSE_DONE)
    return out


async def relay_stream(request: web.Request, resp: aiohttp.ClientResponse, pre: dict, w: PDWorker) -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    await out.write(first_chunk(pre))
    tail = b""
    while True:
        try:
            chunk = await resp.content.readany()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            chunk, error = b"", f"{type(e).__name__}: {e}"
        else:
            error = None
        if not chunk:
            break
        await out.write(chunk)
        tail = (tail + chunk)[-len(SSE_DONE):]
    if error is not None or tail != SSE_DONE:
        w.failures += 1
        body = {"error": {"message": f"decode worker {w.url} failed mid-stream: {error or 'stream cut'}",
                          "type": "server_error", "param": None, "code": "decode_worker_failed"}}
        await out.write(b"data: " + json.dumps(body).encode() + b"\n\n" + SSE_DONE)
    return out


def join_responses(pre: dict, dec: dict) -> dict:
    """One completion from the prefill's first token and the decode's rest."""
    c0, c1 = pre["choices"][0], dec["choices"][0]
    lp = None
    if c0.get("logprobs") and c1.get("logprobs"):
        lp = {k: c0["logprobs"][k] + c1["logprobs"][k] for k in c0["logprobs"] if k != "text_offset"}
    n_gen = 1 + dec["usage"]["completion_tokens"]
    n_prompt = pre["usage"]["prompt_tokens"]
    return {**dec, "id": pre["id"], "choices": [{**c1, "text": c0["text"] + c1["text"], "logprobs": lp}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}
