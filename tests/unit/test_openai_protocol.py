"""Request checks of the OpenAI server that need a model other than the test one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fleetlm.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
)
from fleetlm.entrypoints.openai.serving import OpenAIServing, render_chat

# names only on user turns, as some chat templates do
NAMED_USERS = ("{% for m in messages %}<{{ m.role }}{% if m.role == 'user' and m.name %} {{ m.name }}{% endif %}>"
               "{{ m.content }}{% endfor %}")


class TemplateTokenizer:
    eos_token_ids = (2,)

    def __init__(self, template: str) -> None:
        self.template = ImmutableSandboxedEnvironment().from_string(template)

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        return self.template.render(messages=messages)


def msgs(*specs: tuple[str, str, str | None]) -> list[ChatMessage]:
    return [ChatMessage(role=r, content=c, name=n) for r, c, n in specs]


def test_a_name_the_template_uses_reaches_it():
    tok = TemplateTokenizer(NAMED_USERS)
    text = render_chat(tok, msgs(("system", "be brief", None), ("user", "hi", "ann"), ("user", "yo", "bob")))
    assert text == "<system>be brief<user ann>hi<user bob>yo"


def test_a_name_the_template_ignores_is_refused_naming_the_message():
    tok = TemplateTokenizer(NAMED_USERS)
    with pytest.raises(APIError) as e:
        render_chat(tok, msgs(("user", "hi", "ann"), ("assistant", "hello", "bot"), ("assistant", "x", "bot")))
    assert e.value.status == 400 and e.value.param == "messages[1].name"
    assert render_chat(tok, msgs(("user", "hi", None), ("assistant", "hello", None))) == "<user>hi<assistant>hello"


def serving(vocab: int) -> OpenAIServing:
    engine = SimpleNamespace(model_config=SimpleNamespace(vocab_size=vocab), tokenizer=TemplateTokenizer(""))
    return OpenAIServing(engine, "m")


def test_min_tokens_that_bans_every_token_is_a_400():
    s = serving(vocab=8)
    every_but_eos = [0, 1, 3, 4, 5, 6, 7]
    with pytest.raises(APIError) as e:
        s.sampling_params(CompletionRequest(prompt="x", min_tokens=1, max_tokens=4, stop_token_ids=every_but_eos))
    assert e.value.status == 400 and e.value.param == "min_tokens"
    # with EOS allowed again, or no min_tokens, one token is left to sample
    s.sampling_params(CompletionRequest(prompt="x", min_tokens=1, max_tokens=4, stop_token_ids=every_but_eos,
                                        ignore_eos=True))
    s.sampling_params(CompletionRequest(prompt="x", max_tokens=4, stop_token_ids=every_but_eos))


def test_chat_errors_name_the_fields_the_client_sent():
    s = serving(vocab=8)
    with pytest.raises(APIError) as e:
        s.sampling_params(ChatCompletionRequest(messages=msgs(("user", "hi", None)), logprobs=True, top_logprobs=21))
    assert e.value.param == "top_logprobs" and "logprobs must" not in e.value.message.replace("top_logprobs", "")
    with pytest.raises(APIError) as e:
        s.sampling_params(ChatCompletionRequest(messages=msgs(("user", "hi", None)), max_completion_tokens=0))
    assert e.value.param == "max_completion_tokens" and e.value.message.startswith("max_completion_tokens ")
