"""Request bodies of the OpenAI-compatible API, and the conversion to ``SamplingParams``.

Every model forbids unknown fields, so a parameter we do not implement is a 400 naming it,
never silently ignored. Fields that OpenAI defines but we do not support yet are listed in
``UNSUPPORTED`` so the error says so plainly.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from fleetlm.entrypoints.openai.structured_protocol import StructuredFields, ToolFields
from fleetlm.sampling_params import SamplingParams
from fleetlm.structured.params import StructuredOutputsParams
from fleetlm.structured.tools import call_text

UNSUPPORTED = {
    "functions", "function_call", "logit_bias",
    "suffix", "audio", "modalities", "prediction", "store", "metadata", "service_tier",
    "reasoning_effort", "web_search_options", "best_of",
}

Number = Annotated[float, Field(allow_inf_nan=False, strict=True)]
Int = Annotated[StrictInt, Field(ge=-(1 << 63), lt=1 << 63)]
MAX_N = 128  # samples per prompt
MAX_SEQUENCES = 1024  # prompts x n per HTTP request
MAX_STOP_STRINGS = 64  # per request; matching costs the same per character whatever the count
MAX_STOP_CHARS = 256  # per stop string (it also bounds the text a stream holds back)
MAX_STOP_TOKEN_IDS = 256  # per request


class APIError(Exception):
    """An error answered with an OpenAI-style body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Sampling(StructuredFields):
    """Fields shared by completions and chat completions (output constraints: StructuredFields)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    n: Annotated[Int, Field(ge=1, le=MAX_N)] = 1
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: Int | None = None
    min_p: Number | None = None
    seed: Int | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    user: str | None = None  # logged with the request id
    # extensions (as in vLLM)
    ignore_eos: StrictBool = False
    min_tokens: Int = 0
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    priority: Int | None = None  # lower runs first (as vLLM); with --tenants, within the tenant's range
    cache_salt: Annotated[str, Field(min_length=1, max_length=1024)] | None = None  # private prefix-cache salt

    @model_validator(mode="after")
    def _check(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def aliases(self) -> dict[str, str]:
        """``SamplingParams`` field -> the request field it came from, where the names differ
        (so an error names what the client sent)."""
        return {}

    def stop_list(self) -> list[str]:
        """``stop`` as a list, bounded and valid text (400 naming ``stop[i]`` otherwise)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
        for i, s in enumerate(stops):
            param = "stop" if isinstance(self.stop, str) else f"stop[{i}]"
            if len(s) > MAX_STOP_CHARS:
                raise bad_request(f"{param} has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed", param)
            if not is_valid_text(s):
                raise bad_request(f"{param} is not valid Unicode text (it holds a lone surrogate)", param)
        return stops

    def stop_ids(self) -> tuple[int, ...]:
        ids = tuple(self.stop_token_ids or ())
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise bad_request(f"stop_token_ids has {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
                              "stop_token_ids")
        return ids

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                        structured: StructuredOutputsParams | None = None) -> SamplingParams:
        kw: dict[str, Any] = dict(structured_outputs=structured,
            n=self.n, stop=self.stop_list(), seed=self.seed, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            stop_token_ids=self.stop_ids(), skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, max_tokens=max_tokens,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )
        for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0),
                              ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
            value = getattr(self, name)
            kw[name] = default if value is None else value
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            m = re.search(r"SamplingParams\.(\w+)", str(e))
            param = m.group(1) if m else None
            raise renamed(bad_request(str(e).replace("SamplingParams.", ""), param), self.aliases()) from None


def renamed(err: APIError, aliases: dict[str, str]) -> APIError:
    """``err`` with every engine field name in ``aliases`` replaced by the request's name for it,
    in ``param`` and in the message."""
    if not aliases:
        return err
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, aliases)) + r")\b")
    err.message = pattern.sub(lambda m: aliases[m.group(1)], err.message)
    if err.param is not None:
        err.param = pattern.sub(lambda m: aliases[m.group(1)], err.param)
    return err


def is_valid_text(s: str) -> bool:
    """False for strings that are not Unicode text (lone surrogates from ``\\udXXX`` escapes)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[Int], Field(min_length=1)] \
        | Annotated[list[Annotated[list[Int], Field(min_length=1)]], Field(min_length=1)]
    max_tokens: Int | None = 16
    logprobs: Int | None = None
    echo: StrictBool = False
    kv_transfer_params: dict | None = None  # disaggregated prefill/decode (fleetlm/disagg/http.py)

    def aliases(self) -> dict[str, str]:
        return {"prompt_logprobs": "logprobs"}  # echo's prompt logprobs come from `logprobs`

    def to_sampling_params(self) -> SamplingParams:
        prompt_lp = self.logprobs if self.echo and self.logprobs is not None else None
        return self.sampling_params(self.max_tokens, self.logprobs, prompt_lp, self.structured_params())


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class AssistantToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # assistant: calls it made earlier
    tool_call_id: str | None = None  # tool: the call this message answers

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls is only allowed on assistant messages")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def as_dict(self, with_name: bool = True) -> dict[str, Any]:
        """The message as the chat template sees it (``name`` only if set and ``with_name``).
        Earlier tool calls are also written into the content in the format the model emits
        them, so a template that ignores ``tool_calls`` still shows them."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        d: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if with_name and self.name is not None:
            d["name"] = self.name
        if self.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in self.tool_calls]
            d["content"] = "\n".join([content] * bool(content)
                                     + [call_text(c.function.name, c.function.arguments) for c in self.tool_calls])
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


class ChatCompletionRequest(_Sampling, ToolFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: StrictBool = False
    top_logprobs: Int | None = None
    kv_transfer_params: dict | None = None  # disaggregated prefill/decode (fleetlm/disagg/http.py)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def aliases(self) -> dict[str, str]:
        names = {"logprobs": "top_logprobs"}  # the engine's count of top tokens is top_logprobs
        if self.max_completion_tokens is not None:  # it wins over max_tokens
            names["max_tokens"] = "max_completion_tokens"
        return names

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        n_lp = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(self.limit, n_lp, None, self.structured_params(self.tool_constraint()))


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[Int]
