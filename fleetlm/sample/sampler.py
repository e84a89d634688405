"""Batched sampling: every row has its own settings, all applied as tensor ops.

Order (as users of vLLM expect): a grammar's bitmask first (structured output: forbidden tokens
get -inf), then raw log-probs are taken (what ``logprobs`` reports), then min-tokens bans, repetition / presence / frequency penalties, then greedy rows take the argmax
and the other rows are scaled by temperature, cut by top-k, top-p and min-p, and sampled with an
exponential race (``argmax(p / q)``, ``q ~ Exp(1)``), each seeded row from its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fleetlm.structured.bitmask import apply_token_bitmask


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B] float32; 0 = greedy
    all_greedy: bool
    top_k: torch.Tensor | None = None  # [B] long, 0 = off
    top_p: torch.Tensor | None = None  # [B] float32, 1 = off
    min_p: torch.Tensor | None = None  # [B] float32, 0 = off
    generators: dict[int, torch.Generator] | None = None  # row -> seeded generator
    banned_rows: torch.Tensor | None = None  # min_tokens: (rows, cols) of EOS/stop ids to ban
    banned_cols: torch.Tensor | None = None
    presence_penalty: torch.Tensor | None = None  # [B]
    frequency_penalty: torch.Tensor | None = None  # [B]
    repetition_penalty: torch.Tensor | None = None  # [B]
    output_token_ids: torch.Tensor | None = None  # [B, max_out] padded with vocab_size
    prompt_token_ids: torch.Tensor | None = None  # [B, max_prompt] padded with vocab_size
    max_num_logprobs: int | None = None
    grammar_bitmask: torch.Tensor | None = None  # [B, ceil(V/32)] int32; rows without a grammar all ones


@dataclass
class SamplerOutput:
    sampled: torch.Tensor  # [B] long
    logprob_token_ids: torch.Tensor | None = None  # [B, 1 + N]: sampled token, then top-N
    logprobs: torch.Tensor | None = None  # [B, 1 + N]
    ranks: torch.Tensor | None = None  # [B] rank of the sampled token


def _counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    vocab = logits.shape[1]
    out_counts = _counts(m.output_token_ids, vocab)
    if m.repetition_penalty is not None:
        seen = out_counts > 0
        if m.prompt_token_ids is not None:
            seen |= _counts(m.prompt_token_ids, vocab) > 0
        rp = m.repetition_penalty[:, None].expand_as(logits)
        penalized = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, penalized, logits)
    if m.frequency_penalty is not None:
        logits = logits - m.frequency_penalty[:, None] * out_counts
    if m.presence_penalty is not None:
        logits = logits - m.presence_penalty[:, None] * (out_counts > 0).float()
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, logits.shape[1])
        drop |= torch.arange(logits.shape[1], device=logits.device)[None, :] >= k[:, None]
    if top_p is not None:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        drop |= before >= top_p[:, None]  # keeps the smallest prefix reaching top_p (>= 1 token)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator] | None) -> torch.Tensor:
    q = torch.empty_like(probs).exponential_()
    for row, gen in (generators or {}).items():
        q[row].exponential_(generator=gen)
    return probs.div(q).argmax(dim=-1)


class NoTokenAllowedError(ValueError):
    """``min_tokens`` bans every token the row could take (all of the vocabulary, or all that its
    grammar allows, are stop or EOS ids)."""


def check_some_token_allowed(logits: torch.Tensor, rows: torch.Tensor, grammar: bool = False) -> None:
    """Raise rather than emit token 0 from a row whose every logit is banned. The step fails and
    is re-run one request at a time, so only the offending request ends in an error."""
    rows = rows.unique()
    if torch.isneginf(logits[rows]).all(dim=-1).any():
        where = "the tokens the grammar allows are all" if grammar else "stop_token_ids and EOS cover every token,"
        raise NoTokenAllowedError(f"min_tokens cannot be met: {where} EOS or stop ids, so none can be sampled")


class Sampler:
    def __call__(self, logits: torch.Tensor, m: SamplingMetadata) -> SamplerOutput:
        if m.grammar_bitmask is not None:
            logits = apply_token_bitmask(logits.float(), m.grammar_bitmask)
        raw_logprobs = logits.log_softmax(-1) if m.max_num_logprobs is not None else None
        if m.banned_rows is not None:
            logits = logits.index_put((m.banned_rows, m.banned_cols), torch.tensor(float("-inf")))
            check_some_token_allowed(logits, m.banned_rows, m.grammar_bitmask is not None)
        if m.output_token_ids is not None:
            logits = apply_penalties(logits, m)
        sampled = logits.argmax(dim=-1)
        if not m.all_greedy:
            sampled = torch.where(m.temperature == 0, sampled, self._sample_random(logits, m))
        return self._with_logprobs(sampled, raw_logprobs, m.max_num_logprobs)

    @staticmethod
    def _sample_random(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
        temp = torch.where(m.temperature > 0, m.temperature, 1.0)
        logits = logits / temp[:, None]
        if m.top_k is not None or m.top_p is not None:
            logits = apply_top_k_top_p(logits, m.top_k, m.top_p)
        probs = logits.softmax(-1)
        if m.min_p is not None:
            cutoff = probs.max(dim=-1, keepdim=True).values * m.min_p[:, None]
            probs = probs.masked_fill(probs < cutoff, 0.0)
        return random_sample(probs, m.generators)

    @staticmethod
    def _with_logprobs(sampled: torch.Tensor, raw: torch.Tensor | None, n: int | None) -> SamplerOutput:
        if raw is None:
            return SamplerOutput(sampled)
        sampled_lp = raw.gather(1, sampled[:, None])
        ranks = (raw > sampled_lp).sum(-1) + 1
        top_lp, top_ids = raw.topk(n, dim=-1) if n else (raw[:, :0], sampled[:, None][:, :0])
        ids = torch.cat([sampled[:, None], top_ids], dim=1)
        lps = torch.cat([sampled_lp, top_lp], dim=1)
        return SamplerOutput(sampled, ids, lps, ranks)
