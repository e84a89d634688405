"""Structured output on the real model: 200 requests over 10 constraints all parse and
validate; the server's response_format, tools and their errors through the official client."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from fleetlm import SamplingParams
from tests.server_utils import ServerProcess

pytestmark = pytest.mark.slow

S = {"type": "string", "maxLength": 24}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "address": {"type": "object", "properties": {
        "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}},
     "required": ["name", "address"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "tag": {"enum": ["new", "used"]}}, "required": ["id", "tag"]}}},
     "required": ["items"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "shade": {"type": "integer", "minimum": 1, "maximum": 9}},
     "required": ["color", "shade"]},
    {"type": "object", "properties": {"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                      "rating": {"type": "number", "minimum": 0, "maximum": 5}},
     "required": ["title", "year"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"anyOf": [S, {"type": "null"}]}},
     "required": ["ok", "note"]},
]
MIXED = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "kind": {"enum": ["a", "b"]}, "list": {"type": "array", "maxItems": 2,
                                                                                 "items": S}},
         "required": ["id", "kind", "list"]}
REGEX = r"[A-Z][a-z]{1,10} [A-Z][a-z]{1,10}"
CHOICES = ["positive", "negative", "neutral"]
EBNF = 'root ::= "SELECT " col (", " col){0,2} " FROM " tbl\ncol ::= "id" | "name" | "price"\ntbl ::= "users" | "items"'
EBNF_RE = r"SELECT (id|name|price)(, (id|name|price)){0,2} FROM (users|items)"
QUESTIONS = ["Describe a person.", "List some things for sale.", "Pick a color.", "Recommend a film.",
             "Is the answer yes?", "Name a famous scientist.", "How was the movie?", "Write a short SQL query.",
             "Give me a JSON object about a city.", "Tell me about your day."]


def _checks():
    out = [({"json": s}, lambda t, s=s: jsonschema.validate(json.loads(t), s)) for s in SCHEMAS]
    out += [({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
            ({"choice": CHOICES}, lambda t: t in CHOICES or pytest.fail(t)),
            ({"grammar": EBNF}, lambda t: re.fullmatch(EBNF_RE, t) or pytest.fail(t)),
            # any JSON object (json_object) is an unbounded language: SmolLM2 may nest until
            # max_tokens, so here a bounded schema of several types; json_object runs in the unit tests
            ({"json": MIXED}, lambda t: jsonschema.validate(json.loads(t), MIXED)),
            ({"json": SCHEMAS[2], "disable_any_whitespace": True},
             lambda t: jsonschema.validate(json.loads(t), SCHEMAS[2]) or (t == json.dumps(json.loads(t))
                                                                          or pytest.fail(t)))]  # one form
    return out


def test_200_requests_over_10_constraints_all_validate(llm_fp32):
    checks = _checks()
    prompts, params, validators = [], [], []
    for i in range(200):
        spec, chk = checks[i % 10]
        q = QUESTIONS[(i // 10) % len(QUESTIONS)]
        prompts.append([{"role": "user", "content": f"{q} Answer in the required format."}])
        sampling = {"temperature": 0} if i % 3 == 0 else {"temperature": 0.7, "seed": i}
        params.append(SamplingParams(max_tokens=256, structured_outputs=spec, **sampling))
        validators.append(chk)
    outs = llm_fp32.chat(prompts, params, use_tqdm=False)
    for o, chk in zip(outs, validators):
        c = o.outputs[0]
        assert c.finish_reason == "stop", (c.finish_reason, c.text)
        chk(c.text)
    core = llm_fp32.engine.core
    assert core.scheduler.kv.num_free_blocks == core.cache_config.num_blocks


# -- the server, through the official client --------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                          "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                      "b": {"type": "integer", "minimum": -999, "maximum": 999}}, "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client():
    from openai import OpenAI

    with ServerProcess(["--dtype", "float32", "--kv-cache-memory", "256MiB"]) as srv:
        yield OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def _args_valid(call, tools):
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_response_format_json_schema(client):
    schema = SCHEMAS[0]
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, max_tokens=200, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "person", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_parse_and_validate(client, stream, choice):
    tools = [WEATHER, ADD]
    kw = dict(model="smollm2-135m-instruct", messages=ASK, tools=tools, tool_choice=choice, max_tokens=200,
              temperature=0)
    if not stream:
        r = client.chat.completions.create(**kw)
        msg, reason = r.choices[0].message, r.choices[0].finish_reason
        calls = msg.tool_calls
    else:
        from openai.lib.streaming.chat import ChatCompletionStreamState

        state = ChatCompletionStreamState()
        for chunk in client.chat.completions.create(**kw, stream=True):
            state.handle_chunk(chunk)
        final = state.get_final_completion()
        calls, reason = final.choices[0].message.tool_calls, final.choices[0].finish_reason
    assert reason == "tool_calls" and calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        _args_valid(call, tools)
    if isinstance(choice, dict):
        assert [c.function.name for c in calls] == ["get_weather"]


def test_tool_result_round_trips_and_auto_may_answer_in_text(client):
    first = client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, tools=[WEATHER],
                                           tool_choice="required", max_tokens=120, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=follow, tools=[WEATHER],
                                       tool_choice="auto", max_tokens=60, temperature=0)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "tool_calls", "length")
    if c.message.tool_calls:  # auto: any call it makes is a valid one
        for tc in c.message.tool_calls:
            _args_valid(tc, [WEATHER])
    else:
        assert c.message.content


@pytest.mark.parametrize("kw, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"extra_body": {"structured_outputs": {"regex": "a+", "choice": ["a"]}}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "guided_regex"),
])
def test_bad_constraints_are_400_naming_the_field(client, kw, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, max_tokens=5, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param
