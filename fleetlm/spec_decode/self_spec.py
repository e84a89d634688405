"""``self_spec`` (LayerSkip-style): the target's first ``num_draft_layers`` layers, its final
norm and its LM head are the draft. Those layers' K/V for verified positions are the target's
own (same weights, same inputs), so the draft reads and writes the target's cache: it writes
only positions past the verified ones, which the next verification rewrites before reading."""

from __future__ import annotations

import torch

from fleetlm.spec_decode.chain import run_chain
from fleetlm.spec_decode.paged import Run, paged_forward
from fleetlm.spec_decode.proposer import ProposeBatch, Proposer


class SelfSpecProposer(Proposer):
    def __init__(self, config, runner, tokenizer=None) -> None:
        super().__init__(config, runner)
        n = runner.cfg.num_layers
        if config.num_draft_layers >= n:
            raise ValueError(f"speculative_config.num_draft_layers must be < the target's {n} layers, "
                             f"got {config.num_draft_layers}")
        self.layers = range(config.num_draft_layers)

    def draft_cost(self) -> float:
        return len(self.layers) / self.runner.cfg.num_layers

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        m = self.runner.model.model
        x, residual = m.embed_tokens(ids), None
        for i in self.layers:
            x, residual = m.layers[i](pos, x, residual)
        x, _ = m.norm(x, residual)
        return x

    def _step(self, runs: list[Run], carry: object) -> tuple[torch.Tensor, object]:
        hidden = paged_forward(self.runner, runs, self.runner.kv_caches, lambda ids, pos, order: self._forward(ids, pos))
        return self.runner.model.compute_logits(hidden), None

    def propose(self, batch: ProposeBatch) -> dict[str, list[int]]:
        # only the token sampled last is new to the first layers (the target wrote the rest)
        items = [it for it in batch.items if it.emitted and it.num_drafts > 0]
        first = [Run(it.emitted[-1:], it.start + len(it.valid_inputs), it.block_ids) for it in items]
        return run_chain(items, first, self._step)
