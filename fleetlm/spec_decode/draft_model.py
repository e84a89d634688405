"""``draft_model``: a smaller model with the target's tokenizer, its own paged KV cache on the
target's block ids, run for k steps.

The draft runs only for requests that want drafts in a step; its cache may then fall behind the
target's. ``upto[req]`` is the first position whose draft K/V is not known to be written; the
next drafting step first runs the tokens from there. A request's positions before its first step
(prefix-cache hits) are trusted: they were written by whichever request computed those blocks
when it drafted (stale draft K/V there costs acceptance, never correctness)."""

from __future__ import annotations

import torch

from fleetlm.models.hub import resolve_model
from fleetlm.models.loader import load_model_files
from fleetlm.models.registry import build_model
from fleetlm.plan import kv_cache_bytes_per_token
from fleetlm.spec_decode.chain import run_chain
from fleetlm.spec_decode.paged import Run, paged_forward
from fleetlm.spec_decode.proposer import ProposeBatch, Proposer


def check_same_tokenizer(draft, target) -> None:
    """Drafts are token ids: the draft model must split text exactly as the target does."""
    if draft.vocab_size != target.vocab_size or draft.backend.get_vocab() != target.backend.get_vocab():
        raise ValueError(f"speculative_config.model: the draft model's tokenizer differs from the target's "
                         f"(vocabulary of {draft.vocab_size} vs {target.vocab_size} tokens or different "
                         f"token ids); a draft model must share the target's tokenizer")


class DraftModelProposer(Proposer):
    def __init__(self, config, runner, tokenizer=None) -> None:
        super().__init__(config, runner)
        files = load_model_files(resolve_model(config.model), runner.dtype)
        if tokenizer is not None:
            check_same_tokenizer(files.tokenizer, tokenizer)
        if files.config.vocab_size != runner.cfg.vocab_size:
            raise ValueError(f"speculative_config.model: the draft's vocabulary ({files.config.vocab_size}) "
                             f"differs from the target's ({runner.cfg.vocab_size})")
        self.cfg = files.config
        n = self.cfg.num_layers
        self.model = build_model(files, runner.dtype, runner.max_positions + config.num_speculative_tokens + 2,
                                 range(n), runner.device).eval()
        self.kv_caches: dict[int, torch.Tensor] = {}
        self.upto: dict[str, int] = {}  # per request: draft K/V written for positions before this
        self._params = sum(p.numel() for p in self.model.parameters())

    def kv_bytes_per_token(self) -> int:
        c = self.cfg
        return kv_cache_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, self.runner.dtype.itemsize)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        c = self.cfg
        shape = (c.num_layers, 2, num_blocks, self.runner.block_size, c.num_kv_heads, c.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.runner.dtype, device=self.runner.device)
        self.kv_caches = dict(zip(range(c.num_layers), self.kv_cache.unbind(0)))

    def draft_cost(self) -> float:
        target = sum(p.numel() for p in self.runner.model.parameters())
        return self._params / max(1, target)

    def _step(self, runs: list[Run], carry: object) -> tuple[torch.Tensor, object]:
        hidden = paged_forward(self.runner, runs, self.kv_caches, lambda ids, pos, order: self.model(ids, pos))
        return self.model.compute_logits(hidden), None

    def forget(self, req_ids) -> None:
        for rid in req_ids:
            self.upto.pop(rid, None)

    def propose(self, batch: ProposeBatch) -> dict[str, list[int]]:
        items, first = [], []
        for it in batch.items:
            start = self.upto.setdefault(it.req_id, it.start)
            if it.num_drafts <= 0 or not it.emitted:
                continue
            end = it.start + len(it.valid_inputs) + 1  # through the token sampled last
            items.append(it)
            first.append(Run(it.token_ids[start:end], start, it.block_ids))
            self.upto[it.req_id] = end
        return run_chain(items, first, self._step)
