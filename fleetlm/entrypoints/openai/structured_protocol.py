"""Request fields that constrain the output: OpenAI's ``response_format``, ``tools`` and
``tool_choice``, and vLLM's ``structured_outputs`` / ``guided_*``. At most one constraint per
request; the spec is parsed here so a bad schema, regex or grammar is a 400 naming the field the
client sent (its compilation for the tokenizer happens later, in the engine core)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from fleetlm.structured.backend import check_cached
from fleetlm.structured.params import StructuredOutputsParams
from fleetlm.structured.tools import FunctionTool, tool_call_structural_tag

ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JSONSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsRequest(_Strict):
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: StrictBool | None = None
    structural_tag: dict[str, Any] | str | None = None
    disable_any_whitespace: StrictBool = False


class FunctionDef(_Strict):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(_Strict):
    name: ToolName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


def _bad(message: str, param: str):
    from fleetlm.entrypoints.openai.protocol import bad_request  # protocol imports this module

    return bad_request(message, param)


def _checked(p: StructuredOutputsParams, param: str) -> StructuredOutputsParams:
    try:
        check_cached(p)
    except ValueError as e:
        reason = str(e).split(" is invalid: ", 1)[-1]
        raise _bad(f"{param} is invalid: {reason}", param) from None
    return p


class StructuredFields(BaseModel):
    """The constraint fields of completions and chat completions."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def _constraints(self) -> list[tuple[str, StructuredOutputsParams]]:
        """(field name, params) of every constraint the request gives."""
        found: list[tuple[str, StructuredOutputsParams]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise _bad("response_format of type json_schema needs json_schema.schema", "response_format.json_schema")
            found.append(("response_format.json_schema", StructuredOutputsParams(
                json=rf.json_schema.schema_, strict=bool(rf.json_schema.strict))))
        if self.structured_outputs is not None:
            so = self.structured_outputs
            fields = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
                      "json_object": bool(so.json_object), "structural_tag": so.structural_tag,
                      "disable_any_whitespace": so.disable_any_whitespace}
            try:
                found.append(("structured_outputs", StructuredOutputsParams(**fields)))
            except ValueError as e:
                raise _bad(str(e), "structured_outputs") from None
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                try:
                    found.append((name, StructuredOutputsParams(**{kind: value})))
                except ValueError as e:
                    raise _bad(str(e).replace("structured_outputs." + kind, name), name) from None
        return found

    def structured_params(self, extra: list[tuple[str, StructuredOutputsParams]] = ()) -> StructuredOutputsParams | None:
        found = self._constraints() + list(extra)
        if len(found) > 1:
            names = " and ".join(n for n, _ in found)
            raise _bad(f"give at most one output constraint; got {names}", found[1][0])
        if not found:
            return None
        param, p = found[0]
        return _checked(p, param)


class ToolFields(BaseModel):
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of chat completions."""

    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True

    def function_tools(self) -> list[FunctionTool]:
        return [FunctionTool(t.function.name, t.function.description,
                             t.function.parameters or {"type": "object", "properties": {}})
                for t in self.tools or []]

    @property
    def effective_tool_choice(self) -> str:
        """``none`` | ``auto`` | ``required`` | a function name (OpenAI's default: ``auto``
        with tools, ``none`` without)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or ("auto" if self.tools else "none")

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.effective_tool_choice != "none"

    def tool_constraint(self) -> list[tuple[str, StructuredOutputsParams]]:
        choice = self.effective_tool_choice
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise _bad("tool_choice needs tools", "tool_choice")
        if self.tools:
            names = [t.function.name for t in self.tools]
            if len(set(names)) != len(names):
                raise _bad("tools has two functions with the same name", "tools")
            if choice not in ("none", "auto", "required") and choice not in names:
                raise _bad(f"tool_choice names function {choice!r}, which is not in tools", "tool_choice")
        if not self.calls_tools:
            return []
        tag = tool_call_structural_tag(self.function_tools(), choice, self.parallel_tool_calls)
        return [("tools", StructuredOutputsParams(structural_tag=tag))]
