"""Structured output: the model's answer matches a JSON schema, a regex, a choice, an EBNF
grammar or a tool-call format, enforced token by token with xgrammar bitmasks."""

from fleetlm.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
