"""The proposer interface and its registry.

After the target has verified a step, every proposer sees the whole step (``ProposeBatch``): for
each request, the positions of the step that turned out valid (the input tokens up to the last
accepted draft), the tokens emitted this step and how many drafts to propose (0: none). Drafts are the proposer's argmax: a point-mass draft distribution, for which the
verifier (``verify.py``) is exact rejection sampling.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fleetlm.spec_decode.config import SpeculativeConfig

_PROPOSERS: dict[str, str] = {
    "ngram": "fleetlm.spec_decode.ngram:NgramProposer",
    "draft_model": "fleetlm.spec_decode.draft_model:DraftModelProposer",
    "eagle": "fleetlm.spec_decode.eagle:EagleProposer",
    "medusa": "fleetlm.spec_decode.medusa:MedusaProposer",
    "self_spec": "fleetlm.spec_decode.self_spec:SelfSpecProposer",
}


@dataclass
class ProposeItem:
    """One request of the verified step."""

    req_id: str
    token_ids: list[int]  # prompt + output including the tokens emitted this step
    start: int  # position of the step's first input token
    valid_inputs: list[int]  # the step's input tokens whose K/V (and hidden states) are valid
    hidden_rows: torch.Tensor | None  # indices of those positions in the step's hidden states
    emitted: list[int]  # tokens sampled this step (empty for a prefill chunk that samples nothing)
    num_drafts: int  # drafts wanted (0 = none)
    block_ids: list[int]


@dataclass
class ProposeBatch:
    items: list[ProposeItem]
    hidden: torch.Tensor  # the target's final hidden states of the whole step [T, H]
    num_spec_tokens: int = 0  # the step's k (0: the adaptive rule turned drafting off)
    rebuilt: frozenset[str] = frozenset()  # requests (re)built from scratch this step (new, or after preemption)


class Proposer(ABC):
    """Proposes draft tokens; lives in the worker next to the target model."""

    def __init__(self, config: SpeculativeConfig, runner, tokenizer=None) -> None:
        self.config = config
        self.runner = runner  # the target's ModelRunner (model, backend, block size, device)
        self.tokenizer = tokenizer  # the target's (a draft model must match it)

    def kv_bytes_per_token(self) -> int:
        """Bytes of the proposer's own KV cache per token (0: it keeps none)."""
        return 0

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the proposer's own cache (same block ids as the target's); none by default."""
        return None

    @property
    def max_drafts(self) -> int:
        return self.config.num_speculative_tokens

    @abstractmethod
    def draft_cost(self) -> float:
        """One draft token's cost as a fraction of one target step (the adaptive rule's input)."""

    @abstractmethod
    def propose(self, batch: ProposeBatch) -> dict[str, list[int]]:
        """Draft tokens per request id (at most ``item.num_drafts``; may be fewer or none)."""

    def forget(self, req_ids) -> None:
        """These requests finished or were preempted (their blocks are gone)."""
        return None


def register_proposer(method: str, target: str) -> None:
    _PROPOSERS[method] = target


def build_proposer(config: SpeculativeConfig, runner, tokenizer=None) -> Proposer:
    module, name = _PROPOSERS[config.method].split(":")
    return getattr(importlib.import_module(module), name)(config, runner, tokenizer)


def greedy_ids(logits: torch.Tensor) -> list[int]:
    return logits.argmax(dim=-1).tolist()
