"""``speculative_config``: parsed and validated once, as vLLM spells it.

``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}``.
Every key is checked: an unknown key, an unknown method, ``num_speculative_tokens < 1`` or a key
that the chosen method does not use is a ``ValueError`` naming it (HTTP servers and the CLI turn
that into exit code 2 at start-up).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# method -> keys it accepts beyond the common ones (and which of them it requires)
_METHOD_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "ngram": (frozenset({"prompt_lookup_min", "prompt_lookup_max"}), frozenset()),
    "draft_model": (frozenset({"model"}), frozenset({"model"})),
    "eagle": (frozenset({"model", "verification", "tree"}), frozenset({"model"})),
    "medusa": (frozenset({"model", "verification", "tree"}), frozenset({"model"})),
    "self_spec": (frozenset({"num_draft_layers"}), frozenset({"num_draft_layers"})),
}
_COMMON_KEYS = frozenset({"method", "num_speculative_tokens", "adaptive", "disable_by_batch_size",
                          "knee_tokens", "segment_cost", "draft_cost"})


def speculative_methods() -> list[str]:
    return sorted(_METHOD_KEYS)


@dataclass(frozen=True)
class SpeculativeConfig:
    """One engine's speculation settings (see docs/SPEC_DECODE.md).

    ``adaptive``: pick k per step from measured acceptance and batch size (0 = do not speculate
    this step); ``knee_tokens``: tokens at which a step costs twice a one-token step (the rule's
    cost model); ``draft_cost``: one draft token's cost as a fraction of a
    target step (None = the proposer's own estimate); ``disable_by_batch_size``: never speculate
    when this many requests or more are running.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None
    num_draft_layers: int | None = None
    adaptive: bool = True
    disable_by_batch_size: int | None = None
    knee_tokens: int = 100  # SmolLM2-135M bf16 on a 2-core Xeon (benchmarks/sim_profile_cpu.json)
    segment_cost: float = 0.17  # a multi-token query's own attention segment, per one-token step (same profile)
    draft_cost: float | None = None
    verification: str = "chain"  # eagle, medusa: "chain" or "tree" (spec_decode/tree.py)
    tree: tuple[tuple[int, ...], ...] | None = None  # tree's rank paths (None: tree.default_tree(k))

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | SpeculativeConfig) -> SpeculativeConfig:
        if isinstance(raw, SpeculativeConfig):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"speculative_config must be a JSON object / dict, got {type(raw).__name__}")
        method = raw.get("method")
        if method not in _METHOD_KEYS:
            raise ValueError(f"speculative_config.method {method!r} is not supported; choose one of: "
                             f"{', '.join(speculative_methods())}")
        allowed, required = _METHOD_KEYS[method]
        defaults = {f.name: f.default for f in fields(cls)}
        # a key of another method is refused unless it holds its default (a config that went
        # through serialisation, e.g. to the engine-core process, carries every field)
        unknown = sorted(k for k in set(raw) - _COMMON_KEYS - allowed
                         if k not in defaults or raw[k] != defaults[k])
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) for method {method!r}: {', '.join(unknown)}; "
                             f"accepted: {', '.join(sorted(_COMMON_KEYS | allowed))}")
        missing = sorted(required - set(raw))
        if "num_speculative_tokens" not in raw:
            missing.insert(0, "num_speculative_tokens")
        if missing:
            raise ValueError(f"speculative_config: method {method!r} needs {', '.join(missing)}")
        return cls(**raw)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"speculative_config.{name} {why}, got {getattr(self, name)!r}")

        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "knee_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be an integer >= 1")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            bad("prompt_lookup_min", f"must be <= prompt_lookup_max ({self.prompt_lookup_max})")
        if self.num_draft_layers is not None and (not isinstance(self.num_draft_layers, int)
                                                  or isinstance(self.num_draft_layers, bool)
                                                  or self.num_draft_layers < 1):
            bad("num_draft_layers", "must be an integer >= 1")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            bad("model", "must be a model path or alias")
        if not isinstance(self.adaptive, bool):
            bad("adaptive", "must be true or false")
        v = self.disable_by_batch_size
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            bad("disable_by_batch_size", "must be an integer >= 1")
        if not isinstance(self.segment_cost, (int, float)) or not 0.0 <= self.segment_cost <= 10.0:
            bad("segment_cost", "must be a number in [0, 10]")
        if self.draft_cost is not None and (not isinstance(self.draft_cost, (int, float))
                                            or not 0.0 <= self.draft_cost <= 10.0):
            bad("draft_cost", "must be a number in [0, 10]")
        if self.verification not in ("chain", "tree"):
            bad("verification", "must be 'chain' or 'tree'")
        if self.verification == "tree":
            from fleetlm.spec_decode.tree import parse_tree

            object.__setattr__(self, "tree", parse_tree(self.tree, self.num_speculative_tokens))
        elif self.tree is not None:
            bad("tree", "is only used with verification 'tree'")

    @property
    def uses_draft_kv(self) -> bool:
        """Methods that write K/V for draft positions ahead of the target (need lookahead slots)."""
        return self.method in ("draft_model", "eagle", "self_spec")

    @property
    def max_draft_tokens(self) -> int:
        """Most draft tokens one request verifies in a step: k, or the tree's nodes."""
        return len(self.tree) if self.verification == "tree" else self.num_speculative_tokens

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
