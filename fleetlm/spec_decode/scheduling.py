"""The scheduler's side of speculation: drafts are bookkeeping on ``num_computed_tokens``.

- A decoding request (exactly one known token not yet computed) with drafts asks for
  ``1 + len(drafts)`` tokens; drafts are cut to the step's budget, to ``max_tokens`` and to
  ``max_model_len``. The scheduler adds them to ``num_computed_tokens`` like any token.
- After the step, ``rejected = drafts - (emitted - 1)`` comes off ``num_computed_tokens`` again:
  the rejected positions' K/V slots are simply overwritten later. They are never hashed into
  the prefix cache: the KV manager only hashes blocks full of *known* tokens (``req.num_tokens``
  caps it), and drafts are not known tokens.
- Proposers with their own cache write a few positions ahead of the target; the scheduler
  allocates those slots (``lookahead``) but never more than the request can reach.

Adaptive k (docs/SPEC_DECODE.md): with per-draft acceptance ``a`` (a moving average of the
measured rate), a step with k drafts emits ``E(k) = (1 - a^(k+1)) / (1 - a)`` tokens per request
and costs, relative to a step without drafts, ``C(k) = (f(B (1 + k)) + B s) / f(B) + k c`` where
``B`` is the number of running requests, ``f(T) = 1 + T / knee_tokens`` the cost of a step of T
tokens (``knee_tokens``: where a step costs twice a one-token step; reading the weights
dominates below it, compute above), ``s`` the extra cost of a request whose query holds several
tokens (``segment_cost``: attention runs it as its own segment) and ``c`` the proposer's cost
per draft. The step uses
the k in ``0..K`` that maximises ``E(k) / C(k)``; ``k = 0`` (no drafts) when nothing beats 1.
While speculation is off, one step in ``PROBE_EVERY`` drafts one token to keep measuring, and
only ``PROBE_REQUESTS`` requests verify a probe's drafts: each is one more attention segment in a
batch the rule has just judged too big to gain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetlm.request import Request
from fleetlm.spec_decode.config import SpeculativeConfig
from fleetlm.spec_decode.tree import DraftTree, uses_tree

PROBE_EVERY = 32
PROBE_REQUESTS = 2
EMA_WEIGHT = 0.05
PRIOR_ACCEPTANCE = 0.5


@dataclass
class SpecDecodeStats:
    """Cumulative counters with vLLM's meanings: a *draft* is one request's run of draft tokens
    in one step; ``accepted_per_pos[j]`` counts drafts whose token j (0-based) was accepted."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def as_scheduler_stats(self) -> dict:
        """The ``SchedulerStats`` fields these counters fill."""
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens,
                "spec_accepted_per_pos": tuple(self.accepted_per_pos)}

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification: 1 + accepted drafts per draft (vLLM's definition)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            self.accepted_per_pos[j] += 1


def expected_tokens(a: float, k: int) -> float:
    """Tokens one verification emits with k drafts, each accepted with probability ``a``."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def best_k(a: float, batch: int, k_max: int, knee: int, draft_cost: float, segment_cost: float = 0.0,
           nodes=None) -> int:
    """``nodes(k)``: tokens verified per request with depth k (a tree's nodes; default k)."""
    def f(tokens: int) -> float:
        return 1.0 + tokens / knee

    best, best_gain = 0, 1.0
    for k in range(1, k_max + 1):
        n = nodes(k) if nodes is not None else k
        cost = (f(batch * (1 + n)) + batch * segment_cost) / f(batch) + n * draft_cost
        gain = expected_tokens(a, k) / cost
        if gain > best_gain + 1e-9:
            best, best_gain = k, gain
    return best


class SpecScheduler:
    def __init__(self, config: SpeculativeConfig, draft_cost: float) -> None:
        self.config = config
        self.draft_cost = config.draft_cost if config.draft_cost is not None else draft_cost
        self.drafts: dict[str, list[int]] = {}  # proposed for the request's next step
        self.scheduled: dict[str, int] = {}  # drafts in the step in flight, per request
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * config.num_speculative_tokens)
        self.acceptance = PRIOR_ACCEPTANCE
        self._measured = 0  # drafts verified so far: the estimate is their running mean until EMA_WEIGHT
        self._steps_off = 0
        self._probe_budget: int | None = None  # requests that may still verify the last probe's drafts
        self.last_k = config.num_speculative_tokens
        self.tree = DraftTree(config.tree) if config.verification == "tree" else None

    # -- per step -------------------------------------------------------------------------------
    def step_k(self, num_running: int) -> int:
        """Drafts each request may get proposed after this step (the adaptive rule)."""
        c = self.config
        self._probe_budget = None  # this step's scheduling has consumed the last probe's drafts
        if c.disable_by_batch_size is not None and num_running >= c.disable_by_batch_size:
            k = 0
        elif not c.adaptive:
            k = c.num_speculative_tokens
        else:
            k = best_k(self.acceptance, max(1, num_running), c.num_speculative_tokens, c.knee_tokens, self.draft_cost,
                       c.segment_cost, self.tree.num_nodes if self.tree is not None else None)
            if k == 0:
                self._steps_off += 1
                if self._steps_off >= PROBE_EVERY:
                    self._steps_off, k, self._probe_budget = 0, 1, PROBE_REQUESTS
        self.last_k = k
        return k

    # -- per request ------------------------------------------------------------------------------
    def drafts_for(self, req: Request, budget: int, max_model_len: int) -> list[int]:
        """The drafts to verify in this step (consumed), cut to what fits."""
        drafts = self.drafts.pop(req.request_id, [])
        if not drafts or req.num_tokens - req.num_computed_tokens != 1:
            return []
        if self._probe_budget is not None:  # drafts of a probe: a few requests measure, the rest skip
            if self._probe_budget == 0:
                return []
            self._probe_budget -= 1
        room = min(budget - 1, req.max_tokens - req.num_output_tokens - 1, max_model_len - req.num_tokens)
        return drafts[: max(0, room)]

    def lookahead(self, req: Request, end: int) -> int:
        """Slots past ``end`` (this step's last token + 1) that a proposer with its own cache may
        write: the sampled token's and its drafts' (``k``), never past the request's reach."""
        if not self.config.uses_draft_kv:
            return 0
        reach = req.num_prompt_tokens + req.max_tokens  # no position at or past this is ever written
        return max(0, min(self.config.max_draft_tokens, reach - end))

    def on_scheduled(self, req_id: str, num_drafts: int) -> None:
        if num_drafts:
            self.scheduled[req_id] = num_drafts

    def take_scheduled(self, req_id: str) -> int:
        """Drafts of ``req_id`` in the step just finished (or being split after a failure)."""
        return self.scheduled.pop(req_id, 0)

    def on_output(self, req: Request, emitted: list[int], new_drafts: list[int] | None) -> None:
        """Roll back the rejected drafts and keep the next ones."""
        k = self.take_scheduled(req.request_id)
        if k:
            accepted = max(0, len(emitted) - 1)
            req.num_computed_tokens -= k - accepted
            offered = k
            if self.tree is not None and uses_tree(self.config, req.sampling_params):
                offered = self.tree.depth_of(k)  # k tree nodes; the positions offered are its depth
            self.stats.record(offered, accepted)
            # the prior counts as one draft: the mean of what was measured, then a moving average
            # (a proposer that never hits is off after a couple of drafts, not after ~20)
            self._measured += 1
            self.acceptance += max(EMA_WEIGHT, 1 / (self._measured + 1)) * (accepted / offered - self.acceptance)
        if new_drafts:
            self.drafts[req.request_id] = list(new_drafts)

    def forget(self, req_id: str) -> None:
        """Preempted or finished: its drafts are void."""
        self.drafts.pop(req_id, None)
