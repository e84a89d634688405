"""``POST /v1/completions``: one or a batch of prompts, streamed or not, with echo and logprobs."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fleetlm.entrypoints.openai.logprobs import completion_logprobs
from fleetlm.entrypoints.openai.protocol import CompletionRequest
from fleetlm.entrypoints.openai.serving import (
    SSE_DONE,
    OpenAIServing,
    Prepared,
    check_error,
    close_all,
    collect,
    engine_error,
    merged,
    new_id,
    now_s,
    sse,
    usage,
)
from fleetlm.outputs import CompletionOutput, RequestOutput


class CompletionHandler:
    def __init__(self, serving: OpenAIServing) -> None:
        self.s = serving

    def prepare(self, req: CompletionRequest, arrival: float):
        params = self.s.sampling_params(req)
        rid = new_id("cmpl")
        prepared = [Prepared(f"{rid}-{i}", text, ids) for i, (text, ids) in enumerate(self.s.completion_prompts(req))]
        streams = self.s.start(prepared, params, req.stream, arrival, req.aliases(), req.kv_transfer_params)
        return rid, prepared, streams

    async def full(self, req: CompletionRequest, rid: str, prepared: list[Prepared], streams) -> dict:
        outs = await collect(streams)
        for o in outs:
            check_error(o)
        choices = []
        for i, o in enumerate(outs):
            for c in o.outputs:
                choices.append(self._choice(req, o, c, i * req.n + c.index, with_prompt=req.echo)[0])
        n_gen = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return {"id": rid, "object": "text_completion", "created": now_s(), "model": self.s.model_name,
                "choices": choices, "usage": usage(sum(len(p.prompt_ids) for p in prepared), n_gen)}

    def _choice(self, req: CompletionRequest, o: RequestOutput, c: CompletionOutput, index: int,
                with_prompt: bool, text_offset: int = 0) -> tuple[dict, int]:
        """One choice (or one stream delta of it); ``with_prompt`` prepends the echoed prompt.
        Returns it with the text offset after its logprob tokens (for the next delta)."""
        logprobs = None
        if req.logprobs is not None:
            tokens, lps = list(c.token_ids), list(c.logprobs or [])
            if with_prompt:
                tokens = list(o.prompt_token_ids) + tokens
                lps = list(o.prompt_logprobs or [None] * len(o.prompt_token_ids)) + lps
            logprobs = completion_logprobs(tokens, lps, req.logprobs, text_offset)
            text_offset += sum(len(t or "") for t in logprobs["tokens"])
        text = (self._prompt_text(o) if with_prompt else "") + c.text
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}, text_offset

    def _prompt_text(self, o: RequestOutput) -> str:
        if o.prompt is not None:
            return o.prompt
        return self.s.engine.tokenizer.decode(o.prompt_token_ids, skip_special_tokens=False)

    async def stream(self, req: CompletionRequest, rid: str, prepared: list[Prepared], streams) -> AsyncIterator[bytes]:
        created, n_gen = now_s(), 0
        offsets: dict[int, int] = {}  # choice index -> text offset of its next logprob token
        try:
            async for i, o in merged(streams):
                check_error(o)
                for c in o.outputs:
                    index = i * req.n + c.index
                    n_gen += len(c.token_ids)
                    first = index not in offsets
                    choice, offsets[index] = self._choice(req, o, c, index, req.echo and first, offsets.get(index, 0))
                    yield sse({"id": rid, "object": "text_completion", "created": created,
                               "model": self.s.model_name, "choices": [choice]}
                              | ({"usage": None} if self._include_usage(req) else {}))
            if self._include_usage(req):
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": self.s.model_name,
                           "choices": [], "usage": usage(sum(len(p.prompt_ids) for p in prepared), n_gen)})
        except Exception as e:  # headers are sent: report in-band, then end the stream
            yield sse(engine_error(e).body())
        finally:
            close_all(streams)
        yield SSE_DONE

    @staticmethod
    def _include_usage(req: CompletionRequest) -> bool:
        return req.stream_options is not None and req.stream_options.include_usage
