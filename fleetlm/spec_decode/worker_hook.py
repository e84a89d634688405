"""The worker's side of speculation: verify the drafts of a step, then propose the next ones.

The model runner hands over a step after its forward (``sample_step``). A request that was
scheduled with ``k`` drafts has ``k + 1`` query positions ending at its last token; its logits are
taken at all of them and verified (``verify.py``); the others sample as usual. Then the proposer
sees every request of the step (``ProposeBatch``) and returns drafts, which go back to the
scheduler in ``ModelRunnerOutput.spec_token_ids``: the scheduler owns them from there.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from fleetlm.core.sched_output import Logprob, ModelRunnerOutput, PositionLogprobs
from fleetlm.spec_decode.config import SpeculativeConfig
from fleetlm.spec_decode.proposer import ProposeBatch, ProposeItem, build_proposer
from fleetlm.spec_decode.tree import DraftTree, uses_tree
from fleetlm.spec_decode.tree_propose import TreeProposeBatch
from fleetlm.spec_decode.tree_verify import accept_tree, tree_layout
from fleetlm.spec_decode.verify import accept_prefix
from fleetlm.worker.input_batch import build_sampling_metadata


class SpecDecodeWorker:
    def __init__(self, config: SpeculativeConfig, runner, tokenizer=None, max_positions: int = 0) -> None:
        runner.max_positions = max_positions
        self.config = config
        self.runner = runner
        self.proposer = build_proposer(config, runner, tokenizer)
        self.tree = DraftTree(config.tree) if config.verification == "tree" else None
        self._paths: dict[int, list[int]] = {}  # tree requests of the step: accepted rows (root first)

    def is_tree(self, state) -> bool:
        return self.tree is not None and bool(state.spec_token_ids) and uses_tree(self.config, state.sampling_params)

    def tree_layout(self, states, layout, positions):
        """The runner's layout with tree requests' depth positions and tree masks."""
        if self.tree is None:
            return layout, positions
        return tree_layout(self, states, layout, positions)

    def kv_bytes_per_token(self) -> int:
        return self.proposer.kv_bytes_per_token()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.proposer.initialize_kv_cache(num_blocks)

    def sample_step(self, so, states, layout, hidden: torch.Tensor, input_ids: torch.Tensor) -> ModelRunnerOutput:
        r = self.runner
        q = layout.query_lens
        ends = np.cumsum(q)
        out = ModelRunnerOutput([s.req_id for s in states], [[] for _ in states])
        for i, s in enumerate(states):
            if s.sampling_params.prompt_logprobs is not None:
                lps = r._prompt_logprobs(s, hidden[ends[i] - q[i] : ends[i]], int(layout.context_lens[i]))
                if lps is not None:
                    out.prompt_logprobs[s.req_id] = lps
        ks = [len(s.spec_token_ids) for s in states]
        samples = [i for i, s in enumerate(states) if layout.seq_lens[i] == s.num_tokens + ks[i]]
        self._paths = {}
        if samples:
            self._verify(so, out, states, samples, ks, ends, hidden)
        r.phase = "sample"
        self._propose(so, out, states, layout, hidden, input_ids, ks)
        return out

    def _verify(self, so, out, states, samples, ks, ends, hidden) -> None:
        r = self.runner
        rows = np.concatenate([np.arange(ends[i] - 1 - ks[i], ends[i]) for i in samples])
        logits = r.model.compute_logits(hidden.index_select(0, torch.from_numpy(rows).to(r.device)))
        virtual = [replace(states[i], output_token_ids=states[i].output_token_ids + self._history(states[i], j))
                   for i in samples for j in range(ks[i] + 1)]
        meta = build_sampling_metadata(virtual, logits.shape[1], r.device)
        grammar = getattr(so, "grammar", None)
        if grammar is not None:  # k + 1 rows per request with a grammar: its state after each draft
            meta.grammar_bitmask = grammar.rows_for([v.req_id for v in virtual])
        res = r.sampler(logits, meta)
        sampled = res.sampled.tolist()
        lp = _LogprobRows(res)
        row = 0
        for i in samples:
            s, k = states[i], ks[i]
            # a grammar refuses a draft through its bitmask row (the target may not sample it)
            if self.is_tree(s):  # walk the tree, move the accepted nodes' K/V onto the path's slots
                emitted, rows = accept_tree(self, s, sampled[row : row + k + 1])
                self._paths[i] = rows
            else:
                emitted, rows = accept_prefix(s.spec_token_ids, sampled[row : row + k + 1]), range(k + 1)
            out.sampled_token_ids[i] = emitted
            n = s.sampling_params.logprobs
            if n is not None:
                out.logprobs[s.req_id] = [lp.entry(row + rows[j], n) for j in range(len(emitted))]
            row += k + 1

    def _propose(self, so, out, states, layout, hidden, input_ids, ks) -> None:
        q, ctx = layout.query_lens, layout.context_lens
        starts = np.cumsum(q) - q
        ids = input_ids.tolist()
        items = []
        for i, s in enumerate(states):
            emitted = out.sampled_token_ids[i]
            rejected = ks[i] - (len(emitted) - 1) if emitted and ks[i] else 0
            valid = int(q[i]) - rejected
            a = int(starts[i])
            sp = s.sampling_params
            left = (sp.max_tokens or 0) - len(s.output_token_ids) - len(emitted)  # tokens still allowed
            off = sp.disable_speculation or not emitted  # grammars: one bitmask row per draft position
            want = 0 if off else max(0, min(so.num_spec_tokens, left - 1))
            if i in self._paths:  # a verified tree: the root and the accepted nodes' rows
                rows = [a + r for r in self._paths[i]]
                inputs, hrows = [ids[r] for r in rows], torch.tensor(rows, device=hidden.device)
            else:
                inputs, hrows = ids[a : a + valid], torch.arange(a, a + valid, device=hidden.device)
            items.append(ProposeItem(s.req_id, s.prompt_token_ids + s.output_token_ids + emitted, int(ctx[i]),
                                     inputs, hrows, emitted, want, list(s.block_ids)))
        self.proposer.forget(so.finished_req_ids)
        rebuilt = frozenset(r.req_id for r in so.scheduled_new_reqs)
        self.proposer.forget(rebuilt)
        batch = ProposeBatch(items, hidden, so.num_spec_tokens, rebuilt)
        if self.tree is not None:  # which requests want a tree
            trees = frozenset(s.req_id for s in states if uses_tree(self.config, s.sampling_params))
            batch = TreeProposeBatch(items, hidden, so.num_spec_tokens, rebuilt, trees)
        drafts = self.proposer.propose(batch)
        out.spec_token_ids = {rid: d for rid, d in drafts.items() if d}


    def _history(self, state, j: int) -> list[int]:
        """Drafts emitted before verified row j of a request (row 0: its last known token)."""
        if self.is_tree(state):
            return self.tree.path_tokens(state.spec_token_ids, j - 1)
        return state.spec_token_ids[:j]


class _LogprobRows:
    """The target's raw log-probs per verified row, as ``PositionLogprobs`` entries."""

    def __init__(self, res) -> None:
        self.ids = res.logprob_token_ids.tolist() if res.logprob_token_ids is not None else None
        self.vals = res.logprobs.tolist() if res.logprobs is not None else None
        self.ranks = res.ranks.tolist() if res.ranks is not None else None

    def entry(self, row: int, n: int) -> PositionLogprobs:
        ids, vals = self.ids[row], self.vals[row]
        e = {ids[0]: Logprob(vals[0], self.ranks[row])}
        for k in range(1, n + 1):
            e.setdefault(ids[k], Logprob(vals[k], k))
        return e
