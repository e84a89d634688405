"""The worker's copy of each request's state, and the per-step tensors built from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fleetlm.sample.sampler import SamplingMetadata
from fleetlm.sampling_params import SamplingParams

_SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads (seed, position) pairs over the 64-bit seed space


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: tuple[int, ...]
    prompt_logprobs: list = field(default_factory=list)  # accumulated over prefill chunks
    spec_token_ids: list[int] = field(default_factory=list)  # drafts scheduled after the known tokens
    lora_name: str | None = None  # its LoRA adapter (fleetlm/lora)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        if end > self.num_tokens:  # the drafts being verified follow the known tokens
            n = self.num_tokens
            return self.tokens(start, n) + self.spec_token_ids[max(0, start - n) : end - n]
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def step_generator(self, device: torch.device) -> torch.Generator | None:
        """A generator for this request's next token, seeded from (seed, output position): the
        draw depends on neither the batch nor preemptions, so a seeded request is reproducible."""
        seed = self.sampling_params.seed
        if seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed((seed * _SEED_STRIDE + len(self.output_token_ids)) % (1 << 63))
        return g

    def banned_token_ids(self) -> list[int]:
        """Ids that may not be sampled yet because ``min_tokens`` has not been reached."""
        sp = self.sampling_params
        if len(self.output_token_ids) >= sp.min_tokens:
            return []
        ids = list(sp.stop_token_ids)
        if not sp.ignore_eos:
            ids += self.eos_token_ids
        return ids


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    arr = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        arr[i, : len(r)] = r
    return torch.from_numpy(arr).to(device)


def build_sampling_metadata(states: list[CachedRequestState], vocab_size: int, device: torch.device) -> SamplingMetadata:
    """One row per request that samples this step."""
    sps = [s.sampling_params for s in states]
    temps = torch.tensor([sp.temperature for sp in sps], dtype=torch.float32, device=device)
    m = SamplingMetadata(temperature=temps, all_greedy=all(sp.greedy for sp in sps))

    def col(name: str, off: float, dtype: torch.dtype) -> torch.Tensor | None:
        vals = [getattr(sp, name) for sp in sps]
        if all(v == off for v in vals):
            return None
        return torch.tensor(vals, dtype=dtype, device=device)

    if not m.all_greedy:
        m.top_k = col("top_k", 0, torch.long)
        m.top_p = col("top_p", 1.0, torch.float32)
        m.min_p = col("min_p", 0.0, torch.float32)
        gens = {i: s.step_generator(device) for i, s in enumerate(states) if s.sampling_params.seed is not None and not s.sampling_params.greedy}
        m.generators = gens or None
    banned = [(i, t) for i, s in enumerate(states) for t in s.banned_token_ids() if t < vocab_size]
    if banned:
        m.banned_rows = torch.tensor([b[0] for b in banned], device=device)
        m.banned_cols = torch.tensor([b[1] for b in banned], device=device)
    if any(sp.uses_penalties for sp in sps):
        m.presence_penalty = col("presence_penalty", 0.0, torch.float32)
        m.frequency_penalty = col("frequency_penalty", 0.0, torch.float32)
        m.repetition_penalty = col("repetition_penalty", 1.0, torch.float32)
        m.output_token_ids = _padded([s.output_token_ids for s in states], vocab_size, device)
        if m.repetition_penalty is not None:
            m.prompt_token_ids = _padded([s.prompt_token_ids for s in states], vocab_size, device)
    want = [sp.logprobs for sp in sps if sp.logprobs is not None]
    m.max_num_logprobs = max(want) if want else None
    return m
