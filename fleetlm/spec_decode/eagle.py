"""``eagle``: a one-layer draft head over the target's final hidden states (after its final
norm: the features its LM head reads) and the next token's embedding; the head's output goes
through the target's final norm and LM head, and that normed output is fed back as the next
feature. The head's one layer keeps its own paged KV cache on the target's block ids: the pair
(feature_p, token_{p+1}) is written at position p for every valid position of every step that
drafts (the target's features exist only in the step that computed them). Steps where the
adaptive rule turns drafting off skip the head: those positions stay stale in its cache, which
costs acceptance later, never correctness."""

from __future__ import annotations

import torch

from fleetlm.plan import kv_cache_bytes_per_token
from fleetlm.spec_decode.chain import run_chain
from fleetlm.spec_decode.heads import EAGLE_FORMAT, EagleHead, check_dims, check_target, read_head
from fleetlm.spec_decode.paged import Run, paged_forward
from fleetlm.spec_decode.proposer import ProposeBatch, Proposer
from fleetlm.spec_decode.tree import DraftTree
from fleetlm.spec_decode.tree_propose import eagle_tree, tree_ids

EAGLE_LAYER = 0  # the head's layer index in its own cache


class EagleProposer(Proposer):
    def __init__(self, config, runner, tokenizer=None) -> None:
        super().__init__(config, runner, tokenizer)
        cfg, tensors = read_head(config.model, EAGLE_FORMAT)
        check_dims(cfg, runner.cfg, ("hidden_size", "vocab_size", "num_heads", "num_kv_heads", "head_dim"))
        check_target(cfg, runner.model, config.model)
        with torch.device(runner.device):
            self.head = EagleHead(cfg, runner.cfg, runner.dtype, runner.max_positions + config.num_speculative_tokens + 2,
                                  EAGLE_LAYER)
        self.head.load(tensors)
        self.head.eval()
        self.kv_caches: dict[int, torch.Tensor] = {}
        self.tree = DraftTree(config.tree) if config.verification == "tree" else None

    def kv_bytes_per_token(self) -> int:
        c = self.runner.cfg
        return kv_cache_bytes_per_token(1, c.num_kv_heads, c.head_dim, self.runner.dtype.itemsize)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        c = self.runner.cfg
        shape = (2, num_blocks, self.runner.block_size, c.num_kv_heads, c.head_dim)
        self.kv_caches = {EAGLE_LAYER: torch.zeros(shape, dtype=self.runner.dtype, device=self.runner.device)}

    def draft_cost(self) -> float:
        return 1.5 / self.runner.cfg.num_layers  # one layer, the fc and the LM head

    def _step(self, runs: list[Run], feats: list[torch.Tensor]):
        model = self.runner.model

        def fn(ids: torch.Tensor, pos: torch.Tensor, order: list[int]) -> torch.Tensor:
            f = torch.cat([feats[i] for i in order])
            return model.model.norm(self.head(f, model.model.embed_tokens(ids), pos))

        out = paged_forward(self.runner, runs, self.kv_caches, fn)
        return model.compute_logits(out), out

    def propose(self, batch: ProposeBatch) -> dict[str, list[int]]:
        if batch.num_spec_tokens == 0:
            return {}
        items, first, feats = [], [], []
        for it in batch.items:
            n = len(it.valid_inputs)
            nxt = it.token_ids[it.start + 1 : it.start + 1 + n]  # token p+1 for each valid p
            if not nxt:
                continue
            items.append(it)
            first.append(Run(nxt, it.start, it.block_ids))
            feats.append(batch.hidden[it.hidden_rows[: len(nxt)]])
        if not items:
            return {}
        if self.tree is not None:  # requests that want a tree (tree_propose.py), the rest a chain
            ids = tree_ids(batch)
            trees = [i for i, it in enumerate(items) if it.req_id in ids and it.emitted and it.num_drafts > 0]
            if trees:
                got = eagle_tree(self, [items[i] for i in trees], [first[i] for i in trees],
                                 [feats[i] for i in trees], self.tree)
                rest = [i for i in range(len(items)) if i not in set(trees)]
                if rest:
                    got.update(self._chain([items[i] for i in rest], [first[i] for i in rest], [feats[i] for i in rest]))
                return got
        return self._chain(items, first, feats)

    def _chain(self, items, first, feats) -> dict[str, list[int]]:
        def step(runs: list[Run], carry):
            if carry is None:
                return self._step(runs, feats)
            return self._step(runs, list(carry.unsqueeze(1)))

        return run_chain(items, first, step)
