"""The one error type the planner raises for bad input."""

from __future__ import annotations


class PlanError(ValueError):
    """Bad planner input: the message names what is wrong and the accepted values."""


def choices_error(what: str, value: object, accepted: list[str] | tuple[str, ...]) -> PlanError:
    """``unknown <what> 'value'; accepted values: a, b, c``."""
    return PlanError(f"unknown {what} {value!r}; accepted values: {', '.join(accepted)}")
