"""``POST /v1/chat/completions``: the model's chat template, then generation, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fleetlm.entrypoints.openai.logprobs import chat_logprobs
from fleetlm.entrypoints.openai.protocol import ChatCompletionRequest
from fleetlm.entrypoints.openai.serving import (
    SSE_DONE,
    OpenAIServing,
    Prepared,
    check_error,
    close_all,
    collect,
    engine_error,
    new_id,
    now_s,
    sse,
    usage,
)


class ChatHandler:
    def __init__(self, serving: OpenAIServing) -> None:
        self.s = serving

    def prepare(self, req: ChatCompletionRequest, arrival: float):
        params = self.s.sampling_params(req)
        rid = new_id("chatcmpl")
        text, ids = self.s.chat_prompt(req)
        prepared = [Prepared(rid, text, ids)]
        return rid, prepared, self.s.start(prepared, params, req.stream, arrival, req.aliases())

    def _k(self, req: ChatCompletionRequest) -> int:
        return req.top_logprobs or 0

    async def full(self, req: ChatCompletionRequest, rid: str, prepared: list[Prepared], streams) -> dict:
        (out,) = await collect(streams)
        check_error(out)
        choices = [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(c.token_ids, c.logprobs, self._k(req)) if req.logprobs else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        } for c in out.outputs]
        n_gen = sum(len(c.token_ids) for c in out.outputs)
        return {"id": rid, "object": "chat.completion", "created": now_s(), "model": self.s.model_name,
                "choices": choices, "usage": usage(len(prepared[0].prompt_ids), n_gen)}

    async def stream(self, req: ChatCompletionRequest, rid: str, prepared: list[Prepared], streams) -> AsyncIterator[bytes]:
        created, n_gen = now_s(), 0
        with_usage = req.stream_options is not None and req.stream_options.include_usage
        started: set[int] = set()

        def chunk(choice: dict) -> bytes:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": self.s.model_name, "choices": [choice]} | ({"usage": None} if with_usage else {}))

        try:
            async for out in streams[0]:
                check_error(out)
                for c in out.outputs:
                    n_gen += len(c.token_ids)
                    delta: dict = {}
                    if c.index not in started:  # the role goes with the first content
                        delta["role"] = "assistant"
                        started.add(c.index)
                    if c.text or "role" in delta or c.token_ids:
                        delta["content"] = c.text
                        lp = chat_logprobs(c.token_ids, c.logprobs, self._k(req)) if req.logprobs else None
                        yield chunk({"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": None})
                    if c.finish_reason is not None:
                        yield chunk({"index": c.index, "delta": {}, "logprobs": None,
                                     "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            if with_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": self.s.model_name, "choices": [],
                           "usage": usage(len(prepared[0].prompt_ids), n_gen)})
        except Exception as e:  # headers are sent: report in-band, then end the stream
            yield sse(engine_error(e).body())
        finally:
            close_all(streams)
        yield SSE_DONE
