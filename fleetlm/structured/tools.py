"""Tool calls: the grammar that makes them parse, the prompt that tells the model about them,
and the parser that turns generated text back into OpenAI ``tool_calls``.

The wire format in the generated text is one block per call (the widely used "Hermes" format)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``tool_choice`` decides the grammar (an xgrammar structural tag):

- ``"none"``: no grammar, and the tools are not shown to the model;
- ``"auto"``: free text, but once the model writes ``<tool_call>`` the call must name a tool
  and its ``arguments`` must match that tool's JSON schema;
- ``"required"``: only calls (at least one), nothing else;
- a named function: exactly one call of that function.

``parallel_tool_calls=False`` stops the grammar after the first call. A chat template that
renders ``tools`` itself gets them; for one that does not, the tools and the format are put in a
system message (``tools_system_prompt``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

BEGIN, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(BEGIN) + r"\s*(\{.*?\})\s*" + re.escape(END), re.S)


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON schema (an empty object schema if none given)

    def as_openai(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


def _tag(tool: FunctionTool) -> dict[str, Any]:
    return {"type": "tag", "begin": f'{BEGIN}\n{{"name": {json.dumps(tool.name)}, "arguments": ',
            "content": {"type": "json_schema", "json_schema": tool.parameters}, "end": f"}}\n{END}"}


def tool_call_structural_tag(tools: list[FunctionTool], choice: str, parallel: bool = True) -> dict[str, Any]:
    """The structural tag for ``choice``: ``"auto"``, ``"required"`` or a tool's name."""
    if choice == "auto":
        fmt = {"type": "triggered_tags", "triggers": [BEGIN], "tags": [_tag(t) for t in tools],
               "at_least_one": False, "stop_after_first": not parallel}
    elif choice == "required":
        fmt = {"type": "tags_with_separator", "tags": [_tag(t) for t in tools], "separator": "\n",
               "at_least_one": True, "stop_after_first": not parallel}
    else:
        (tool,) = [t for t in tools if t.name == choice]
        fmt = _tag(tool)
    return {"type": "structural_tag", "format": fmt}


def tools_system_prompt(tools: list[FunctionTool]) -> str:
    """Tells a model whose chat template ignores ``tools`` what it may call, and how."""
    listing = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to help with the user's request. The functions are:\n"
            f"<tools>\n{listing}\n</tools>\n"
            f"To call a function, write {BEGIN}\n{{\"name\": <function name>, \"arguments\": <arguments as a "
            f"JSON object>}}\n{END}")


def call_text(name: str, arguments: str) -> str:
    """An earlier assistant call, written back into the conversation in the same format."""
    return f'{BEGIN}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{END}'


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content outside the calls or None, OpenAI ``tool_calls``) of a finished answer. A block
    that is not a complete, valid call (cut by ``max_tokens``) stays in the content."""
    calls: list[dict[str, Any]] = []
    content: list[str] = []
    pos = 0
    for m in _CALL.finditer(text):
        call = _decode_call(m.group(1))
        if call is None:
            continue
        content.append(text[pos:m.start()])
        pos = m.end()
        calls.append(call)
    content.append(text[pos:])
    rest = "".join(content).strip()
    return (rest or None), calls


def _decode_call(body: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or "arguments" not in obj:
        return None
    args = obj["arguments"]
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


class ToolCallStreamParser:
    """Splits a stream of text deltas into content deltas and completed calls.

    Text is passed on as content until a possible ``<tool_call>`` starts; from there it is held
    back until the block closes, then emitted as one call (name and whole arguments in one
    delta, which OpenAI clients accumulate like any other)."""

    def __init__(self) -> None:
        self.buffer = ""
        self.num_calls = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += delta
        content, calls = "", []
        while True:
            start = self.buffer.find(BEGIN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self.buffer, BEGIN)
                content += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            content += self.buffer[:start]
            self.buffer = self.buffer[start:]
            m = _CALL.match(self.buffer)
            if m is None:
                if final:  # an unfinished block: it was text after all
                    content += self.buffer
                    self.buffer = ""
                break
            call = _decode_call(m.group(1))
            if call is None:
                content += m.group(0)
            else:
                call["index"] = self.num_calls
                self.num_calls += 1
                calls.append(call)
            self.buffer = self.buffer[m.end():]
        return content, calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
