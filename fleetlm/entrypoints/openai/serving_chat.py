"""``POST /v1/chat/completions``: the model's chat template, then generation, streamed or not.

With ``tools`` (and ``tool_choice`` other than ``none``) the answer's ``<tool_call>`` blocks
(``structured/tools.py``) come back as OpenAI ``tool_calls``, streamed as deltas too, with
``finish_reason: "tool_calls"`` when the model stopped after calling."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fleetlm.entrypoints.openai.logprobs import chat_logprobs
from fleetlm.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage
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
    render_chat,
    safe_encode,
    sse,
    usage,
)
from fleetlm.structured.tools import ToolCallStreamParser, parse_tool_calls, tools_system_prompt


class ChatHandler:
    def __init__(self, serving: OpenAIServing) -> None:
        self.s = serving

    def prepare(self, req: ChatCompletionRequest, arrival: float, prompt_ids: list[int] | None = None):
        """``prompt_ids``: the engine prompt, already known (a decode after a remote prefill:
        the conversation's tokens and the first token, fleetlm/disagg/http.py)."""
        params = self.s.sampling_params(req)
        rid = new_id("chatcmpl")
        text, ids = (None, prompt_ids) if prompt_ids is not None else self.prompt(req)
        prepared = [Prepared(rid, text, ids)]
        return rid, prepared, self.s.start(prepared, params, req.stream, arrival, req.aliases(), req.kv_transfer_params)

    def prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        """The rendered conversation and its token ids."""
        return self._prompt(req) if req.calls_tools else self.s.chat_prompt(req)

    def _k(self, req: ChatCompletionRequest) -> int:
        return req.top_logprobs or 0

    def _prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        """The conversation with the tools: given to a template that renders them, else
        described in the system message."""
        tok, tools = self.s.engine.tokenizer, req.function_tools()
        if tok.template_renders_tools:
            text = render_chat(tok, req.messages, tools=[t.as_openai() for t in tools])
        else:
            msgs = list(req.messages)
            intro = tools_system_prompt(tools)
            if msgs[0].role in ("system", "developer"):
                first = msgs[0].as_dict()["content"]
                msgs[0] = ChatMessage(role="system", content=f"{first}\n\n{intro}" if first else intro)
            else:
                msgs.insert(0, ChatMessage(role="system", content=intro))
            text = render_chat(tok, msgs)
        return text, safe_encode(tok, text, "messages", add_special_tokens=False)

    @staticmethod
    def _message(req: ChatCompletionRequest, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        if not req.calls_tools:
            return {"role": "assistant", "content": text}, finish_reason
        content, calls = parse_tool_calls(text)
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, reason

    async def full(self, req: ChatCompletionRequest, rid: str, prepared: list[Prepared], streams) -> dict:
        (out,) = await collect(streams)
        check_error(out)
        choices = []
        for c in out.outputs:
            message, reason = self._message(req, c.text, c.finish_reason)
            choices.append({
                "index": c.index,
                "message": message,
                "logprobs": chat_logprobs(c.token_ids, c.logprobs, self._k(req)) if req.logprobs else None,
                "finish_reason": reason,
                "stop_reason": c.stop_reason,
            })
        n_gen = sum(len(c.token_ids) for c in out.outputs)
        return {"id": rid, "object": "chat.completion", "created": now_s(), "model": self.s.model_name,
                "choices": choices, "usage": usage(len(prepared[0].prompt_ids), n_gen)}

    async def stream(self, req: ChatCompletionRequest, rid: str, prepared: list[Prepared], streams) -> AsyncIterator[bytes]:
        created, n_gen = now_s(), 0
        with_usage = req.stream_options is not None and req.stream_options.include_usage
        started: set[int] = set()
        parsers: dict[int, ToolCallStreamParser] = {}

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
                    text, calls = c.text, []
                    if req.calls_tools:
                        parser = parsers.setdefault(c.index, ToolCallStreamParser())
                        text, calls = parser.feed(c.text, final=c.finish_reason is not None)
                    if text or "role" in delta or (c.token_ids and not req.calls_tools):
                        delta["content"] = text
                        lp = chat_logprobs(c.token_ids, c.logprobs, self._k(req)) if req.logprobs else None
                        yield chunk({"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": None})
                    if calls:
                        yield chunk({"index": c.index, "delta": {"tool_calls": calls}, "logprobs": None,
                                     "finish_reason": None})
                    if c.finish_reason is not None:
                        called = c.index in parsers and parsers[c.index].num_calls > 0
                        reason = "tool_calls" if called and c.finish_reason == "stop" else c.finish_reason
                        yield chunk({"index": c.index, "delta": {}, "logprobs": None,
                                     "finish_reason": reason, "stop_reason": c.stop_reason})
            if with_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": self.s.model_name, "choices": [],
                           "usage": usage(len(prepared[0].prompt_ids), n_gen)})
        except Exception as e:  # headers are sent: report in-band, then end the stream
            yield sse(engine_error(e).body())
        finally:
            close_all(streams)
        yield SSE_DONE
