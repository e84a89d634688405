"""Per-request sampling settings, validated up front (an invalid value raises ``ValueError``
naming the field)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from fleetlm.structured.params import StructuredOutputsParams

INT64 = 1 << 63


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops.

    Defaults follow vLLM: ``temperature=1.0``, ``max_tokens=16``. ``temperature=0`` is greedy.
    ``top_k`` of 0 or -1 disables top-k. ``logprobs=N`` returns the top-N log-probabilities of the
    model's raw distribution (before penalties and temperature) for every generated token, plus
    the sampled token's; ``prompt_logprobs=N`` does the same for each prompt token after the first.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()  # a set: the per-token stop check is O(1)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    disable_speculation: bool = False  # this request opts out of speculative decoding
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "structured_outputs", _structured(self.structured_outputs))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        try:
            object.__setattr__(self, "stop_token_ids", frozenset(self.stop_token_ids or ()))
        except TypeError:
            raise ValueError(f"SamplingParams.stop_token_ids must be integers, got {self.stop_token_ids!r}") from None
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                bad(name, "must be a finite number")
        for name in ("n", "top_k", "seed", "max_tokens", "min_tokens"):
            v = getattr(self, name)
            if isinstance(v, int) and not -INT64 <= v < INT64:
                bad(name, "must fit in a signed 64-bit integer")
        if any(isinstance(t, int) and t >= INT64 for t in self.stop_token_ids):
            bad("stop_token_ids", "must fit in a signed 64-bit integer")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 1, or 0 / -1 to disable")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0 or v > 20):
                bad(name, "must be an integer in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if self.structured_outputs is not None and self.ignore_eos:
            bad("ignore_eos", "cannot be used with structured_outputs (the grammar ends on EOS)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def for_sample(self, index: int) -> SamplingParams:
        """Params of the ``index``-th of ``n`` parallel samples: n=1, seed offset by index."""
        seed = None if self.seed is None else (self.seed + index + INT64) % (2 * INT64) - INT64  # stays 64-bit
        return replace(self, n=1, seed=seed)


def _structured(value: Any) -> StructuredOutputsParams | None:
    """``structured_outputs`` as given, or built from a dict of its fields."""
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, dict):
        unknown = set(value) - set(StructuredOutputsParams.__dataclass_fields__)
        if unknown:
            raise ValueError(f"SamplingParams.structured_outputs has unknown field(s) {sorted(unknown)}")
        return StructuredOutputsParams(**value)
    raise ValueError(f"SamplingParams.structured_outputs must be a StructuredOutputsParams or a dict, "
                     f"got {type(value).__name__}")
