"""``medusa``: K heads on the target's final hidden state of the last valid position p; head j
proposes token p + 2 + j (token p + 1 is the one the target just sampled). No cache of its own."""

from __future__ import annotations

import torch

from fleetlm.spec_decode.heads import (
    MEDUSA_FORMAT,
    MedusaHeads,
    check_dims,
    check_target,
    read_head,
)
from fleetlm.spec_decode.proposer import ProposeBatch, Proposer
from fleetlm.spec_decode.tree import DraftTree
from fleetlm.spec_decode.tree_propose import medusa_tree, split


class MedusaProposer(Proposer):
    def __init__(self, config, runner, tokenizer=None) -> None:
        super().__init__(config, runner, tokenizer)
        cfg, tensors = read_head(config.model, MEDUSA_FORMAT)
        check_dims(cfg, runner.cfg, ("hidden_size", "vocab_size"))
        check_target(cfg, runner.model, config.model)
        if config.num_speculative_tokens > cfg["num_heads"]:
            raise ValueError(f"speculative_config.num_speculative_tokens ({config.num_speculative_tokens}) exceeds "
                             f"the Medusa heads ({cfg['num_heads']})")
        with torch.device(runner.device):
            self.heads = MedusaHeads(cfg, runner.dtype)
        self.heads.load(tensors)
        self.heads.eval()
        self.has_lm_head = bool(cfg.get("has_lm_head"))
        self.tree = DraftTree(config.tree) if config.verification == "tree" else None

    def draft_cost(self) -> float:
        return 0.5 / self.runner.cfg.num_layers

    def _logits(self, j: int, h: torch.Tensor) -> torch.Tensor:
        x = self.heads.hidden(j, h)
        if self.has_lm_head:
            return self.heads.heads[j].lm_head(x).float()
        return self.runner.model.compute_logits(x)

    def propose(self, batch: ProposeBatch) -> dict[str, list[int]]:
        items = [it for it in batch.items if it.emitted and it.num_drafts > 0]
        if not items:
            return {}
        if self.tree is not None:  # requests that want a tree (tree_propose.py), the rest a chain
            chain, trees = split(batch, items)
            got = medusa_tree(self, batch, trees, self.tree) if trees else {}
            if chain:
                got.update(self._chain(batch, chain))
            return got
        return self._chain(batch, items)

    def _chain(self, batch: ProposeBatch, items) -> dict[str, list[int]]:
        rows = torch.stack([it.hidden_rows[-1] for it in items])
        h = batch.hidden.index_select(0, rows)
        k = max(it.num_drafts for it in items)
        cols = [self._logits(j, h).argmax(-1).tolist() for j in range(k)]
        return {it.req_id: [cols[j][i] for j in range(it.num_drafts)] for i, it in enumerate(items)}
