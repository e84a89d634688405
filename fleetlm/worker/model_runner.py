"""Turns a ``SchedulerOutput`` into one forward pass and the sampled tokens.

Per step: update the request states, lay the batch out (decodes first), build input ids,
positions, the slot mapping and the block table, run the model inside ``forward_context``,
compute logits only for rows that sample (a request whose known tokens are all computed), sample,
and gather the requested log-probs.

Every rank runs the same steps on the same states. A pipeline stage that is not the first
receives the previous stage's hidden states instead of embedding ids; one that is not the last
sends its own on and returns None. On the last stage every TP rank joins the LM head's gather,
and only TP rank 0 (the output rank) samples and returns a ``ModelRunnerOutput``.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from fleetlm.attention.base import BatchLayout, ForwardContext, forward_context
from fleetlm.attention.registry import get_attention_backend
from fleetlm.core.sched_output import Logprob, ModelRunnerOutput, PositionLogprobs, SchedulerOutput
from fleetlm.distributed.communication import recv_from_prev_stage, send_to_next_stage
from fleetlm.distributed.parallel_state import parallel_state
from fleetlm.layers.linear import kv_heads_per_rank
from fleetlm.sample.sampler import Sampler, SamplerOutput
from fleetlm.structured.bitmask import GrammarBitmask
from fleetlm.worker.input_batch import CachedRequestState, build_sampling_metadata

FAULT_ENV = "FLEETLM_FAULT_TOKEN_ID"


class ModelRunner:
    def __init__(self, model: torch.nn.Module, *, block_size: int, device: torch.device,
                 eos_token_ids: tuple[int, ...], attention_backend: str = "auto",
                 kv_cache_dtype: str = "auto") -> None:
        self.model = model
        self.cfg = model.config
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.backend = get_attention_backend(attention_backend, device, block_size, next(model.parameters()).dtype,
                                             kv_cache_dtype)
        self.sampler = Sampler()
        self.kv_caches: dict[int, torch.Tensor] = {}
        self.kv_cache: torch.Tensor | None = None
        self.rank = parallel_state()
        self.dtype = next(model.parameters()).dtype
        self._pending_sends: list = []
        self.phase = "prepare"  # where the last step was: prepare | forward | sample
        self.states: dict[str, CachedRequestState] = {}
        self.spec = None  # speculative decoding (fleetlm/spec_decode/worker_hook.py), set by the worker
        self.lora = None  # LoRAManager (fleetlm/lora/serving.py), set by the worker when LoRA is enabled
        fault = os.environ.get(FAULT_ENV)
        self.fault_token_id = int(fault) if fault else None

    @property
    def layer_ids(self) -> range:
        return self.model.layer_range

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank holds: ``num_kv_heads / tp``, at least one (replicated past that)."""
        return kv_heads_per_rank(self.cfg.num_kv_heads, self.rank.tp_size)

    def initialize_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> None:
        """One tensor [this stage's layers, 2, num_blocks, block_size, this rank's kv_heads,
        head_dim]; per-layer views keyed by the layer's index in the model."""
        c, layers = self.cfg, self.layer_ids
        fmt = self.backend.kv_format  # a quantized KV cache: its storage dtype and row size
        head = c.head_dim if fmt is None else fmt.head_size(c.head_dim)
        shape = (len(layers), 2, num_blocks, self.block_size, self.num_kv_heads, head)
        self.kv_cache = torch.zeros(shape, dtype=dtype if fmt is None else fmt.storage, device=self.device)
        self.kv_caches = dict(zip(layers, self.kv_cache.unbind(0)))
        if self.spec is not None:
            self.spec.initialize_kv_cache(num_blocks)

    # -- state ----------------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids:
            self.states.pop(rid, None)
        for r in so.scheduled_new_reqs:
            self.states[r.req_id] = CachedRequestState(
                r.req_id, r.prompt_token_ids, list(r.output_token_ids), r.sampling_params,
                list(r.block_ids), r.num_computed_tokens, self.eos_token_ids, lora_name=r.lora_name)
        for r in so.scheduled_cached_reqs:
            st = self.states[r.req_id]
            st.block_ids.extend(r.new_block_ids)
            st.output_token_ids.extend(r.new_token_ids)
            st.num_computed_tokens = r.num_computed_tokens
            st.spec_token_ids = list(r.spec_token_ids)

    def _layout(self, so: SchedulerOutput) -> tuple[list[CachedRequestState], BatchLayout, torch.Tensor, torch.Tensor]:
        ids = sorted(so.num_scheduled_tokens, key=lambda r: so.num_scheduled_tokens[r] != 1)
        states = [self.states[r] for r in ids]
        q_lens = np.array([so.num_scheduled_tokens[r] for r in ids], dtype=np.int64)
        ctx = np.array([s.num_computed_tokens for s in states], dtype=np.int64)
        width = max(len(s.block_ids) for s in states)
        table = np.zeros((len(states), width), dtype=np.int64)
        tokens: list[int] = []
        for i, s in enumerate(states):
            table[i, : len(s.block_ids)] = s.block_ids
            tokens += s.tokens(int(ctx[i]), int(ctx[i] + q_lens[i]))
        rows = np.repeat(np.arange(len(states)), q_lens)
        positions = np.arange(len(tokens)) - np.repeat(np.cumsum(q_lens) - q_lens, q_lens) + ctx[rows]
        slots = table[rows, positions // self.block_size] * self.block_size + positions % self.block_size
        layout = BatchLayout(q_lens, ctx, table, torch.from_numpy(slots), int((q_lens == 1).sum()))
        if self.spec is not None:  # tree drafts: depth positions and a tree mask (spec_decode/tree.py)
            layout, positions = self.spec.tree_layout(states, layout, positions)
        dev = self.device
        return states, layout, torch.tensor(tokens, device=dev), torch.from_numpy(positions).to(dev)

    # -- step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput | None:
        self.phase = "prepare"  # no collective yet: an error here is the same on every rank
        self._update_states(so)
        if so.is_empty:
            return ModelRunnerOutput([], []) if self.rank.is_output_rank else None
        states, layout, input_ids, positions = self._layout(so)
        if self.fault_token_id is not None:
            self._inject_fault(states)
        meta = self.backend.build_metadata(layout, self.device)
        self.phase = "forward"  # collectives: an error here leaves the other ranks waiting
        intermediate = None if self.rank.is_first_stage else self._recv_intermediate(len(input_ids))
        with forward_context(ForwardContext(self.backend, meta, self.kv_caches)), self._lora_batch(states, layout):
            hidden = self.model(input_ids, positions, intermediate)
        for i, s in enumerate(states):
            s.num_computed_tokens = int(layout.seq_lens[i])
        if not self.rank.is_last_stage:
            self._send_intermediate(hidden)
            return None
        if self.spec is not None:
            return self.spec.sample_step(so, states, layout, hidden, input_ids)
        return self._sample_step(states, layout, hidden, so.grammar)

    def _sample_step(self, states: list[CachedRequestState], layout: BatchLayout,
                     hidden: torch.Tensor, grammar: GrammarBitmask | None = None) -> ModelRunnerOutput | None:
        """Logits for the rows that sample (and prompt log-probs); every TP rank of the last stage
        joins the gathers, the output rank samples."""
        ends = np.cumsum(layout.query_lens)
        samples = [i for i, s in enumerate(states) if layout.seq_lens[i] == s.num_tokens]
        out = ModelRunnerOutput([s.req_id for s in states], [[] for _ in states])
        for i, s in enumerate(states):
            if s.sampling_params.prompt_logprobs is not None:
                lps = self._prompt_logprobs(s, hidden[ends[i] - layout.query_lens[i] : ends[i]], int(layout.context_lens[i]))
                if lps is not None:
                    out.prompt_logprobs[s.req_id] = lps
        if samples:
            rows = torch.from_numpy(ends[samples] - 1).to(self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
            self.phase = "sample"  # after the last collective: only the output rank works on
            if logits is not None:
                sampling = [states[i] for i in samples]
                meta = build_sampling_metadata(sampling, logits.shape[1], self.device)
                if grammar is not None:
                    meta.grammar_bitmask = grammar.rows_for([s.req_id for s in sampling])
                result = self.sampler(logits, meta)
                self._emit(out, samples, sampling, result)
        return out if self.rank.is_output_rank else None

    def _lora_batch(self, states: list[CachedRequestState], layout: BatchLayout):
        """The step's tokens grouped by LoRA adapter, for the adapters' forward hooks."""
        if self.lora is None:
            return contextlib.nullcontext()
        from fleetlm.lora.serving import lora_batch, token_groups

        return lora_batch(token_groups([s.lora_name for s in states], layout.query_lens, self.device))

    def _recv_intermediate(self, num_tokens: int):
        from fleetlm.models.llama import IntermediateTensors

        buf = recv_from_prev_stage((2, num_tokens, self.cfg.hidden_size), self.dtype, self.device)
        return IntermediateTensors(buf[0], buf[1])

    def _send_intermediate(self, it) -> None:
        """Start sending (hidden, residual) to the next stage; sends finish in order, so only
        the older ones are waited for."""
        while len(self._pending_sends) > 4:
            self._pending_sends.pop(0)[0].wait()
        buf = torch.stack((it.hidden, it.residual))
        self._pending_sends.append((send_to_next_stage(buf), buf))  # the buffer lives until sent

    def _inject_fault(self, states: list[CachedRequestState]) -> None:
        """Test hook (``FLEETLM_FAULT_TOKEN_ID``): a step holding a request whose prompt contains
        that token raises, as a bug in a kernel or sampler would."""
        for s in states:
            if self.fault_token_id in s.prompt_token_ids:
                raise RuntimeError(f"injected fault: request {s.req_id} holds token {self.fault_token_id}")

    def _emit(self, out: ModelRunnerOutput, samples: list[int], states: list[CachedRequestState], r: SamplerOutput) -> None:
        tokens = r.sampled.tolist()
        lp_ids = r.logprob_token_ids.tolist() if r.logprob_token_ids is not None else None
        lp_vals = r.logprobs.tolist() if r.logprobs is not None else None
        ranks = r.ranks.tolist() if r.ranks is not None else None
        for j, (i, s) in enumerate(zip(samples, states)):
            out.sampled_token_ids[i] = [tokens[j]]  # the state gets it back from the scheduler
            n = s.sampling_params.logprobs
            if n is not None and lp_ids is not None:
                entry = {lp_ids[j][0]: Logprob(lp_vals[j][0], ranks[j])}
                for k in range(1, n + 1):
                    entry.setdefault(lp_ids[j][k], Logprob(lp_vals[j][k], k))
                out.logprobs[s.req_id] = [entry]

    def _prompt_logprobs(self, s: CachedRequestState, hidden: torch.Tensor, start: int) -> list[PositionLogprobs | None] | None:
        """Log-probs of prompt tokens ``start+1 ..`` predicted from this chunk; complete list
        (first entry None, as the first token has no prediction) once the prompt is done."""
        n_prompt = len(s.prompt_token_ids)
        end = min(start + hidden.shape[0], n_prompt)
        if start == 0:
            s.prompt_logprobs = [None]
        count = max(0, min(end, n_prompt - 1) - start)  # positions whose next token is a prompt token
        if count:
            logits = self.model.compute_logits(hidden[:count])
            if logits is None:  # not the output rank: it only joined the gather
                return None
            logprobs = logits.log_softmax(-1)
            targets = torch.tensor(s.prompt_token_ids[start + 1 : start + 1 + count], device=self.device)
            tgt_lp = logprobs.gather(1, targets[:, None])
            ranks = ((logprobs > tgt_lp).sum(-1) + 1).tolist()
            k = s.sampling_params.prompt_logprobs or 0
            top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
            for p in range(count):
                entry = {int(targets[p]): Logprob(float(tgt_lp[p, 0]), ranks[p])}
                for q in range(k):
                    entry.setdefault(int(top_ids[p, q]), Logprob(float(top_lp[p, q]), q + 1))
                s.prompt_logprobs.append(entry)
        if end >= n_prompt and start < n_prompt:
            return s.prompt_logprobs
        return None
