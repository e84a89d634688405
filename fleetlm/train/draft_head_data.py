"""Self-distillation data for draft heads: prompts, the target's own continuations, its features.

Prompts come from sources that ship with fleetlm or the machine (nothing is downloaded):

- ``chat``: ``fleetlm/train/data/chat_prompts.json`` (templates x subjects, plus standalone
  prompts), shuffled by the seed;
- ``stdlib``: "explain this code" prompts over short functions of this Python's standard library;
- a ``.txt`` file (one prompt per line) or a ``.jsonl`` file (``{"prompt": ...}`` per line).

The target (fleetlm's own ``LLM``) answers each prompt through its chat template, greedy or
sampled; a sample is the whole token sequence (prompt + answer) and where the answer starts.
Features are the target's final hidden states after its final norm (what its LM head reads and
what the proposers receive from the engine), computed by the same model class in plain mode, in
the serving dtype, and kept in float32.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

CHAT_PROMPTS = Path(__file__).parent / "data" / "chat_prompts.json"
BUILTIN_SOURCES = ("chat", "stdlib")


@dataclass(frozen=True)
class Sample:
    """One prompt and the target's answer: ``tokens[:prompt_len]`` is the templated prompt."""

    tokens: tuple[int, ...]
    prompt_len: int


def chat_prompts() -> list[str]:
    raw = json.loads(CHAT_PROMPTS.read_text())
    return [t.format(s=s) for t in raw["templates"] for s in raw["subjects"]] + list(raw["standalone"])


def stdlib_prompts(limit: int = 400) -> list[str]:
    """"Explain this code" prompts over short top-level functions of the standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and 4 <= node.end_lineno - node.lineno + 1 <= 14:
                code = ast.get_source_segment(src, node)
                if code:
                    out.append(f"Explain what this Python function does:\n\n{code}")
        if len(out) >= limit:
            break
    return out


def file_prompts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or not isinstance(r.get("prompt"), str)]
        if bad:
            raise ValueError(f"draft-head data {path}: line {bad[0] + 1} has no string field 'prompt'")
        return [r["prompt"] for r in rows]
    return [line for line in path.read_text().splitlines() if line.strip()]


def check_sources(sources: Sequence[str]) -> None:
    """Every source must be a built-in name or an existing .txt/.jsonl file (checked before any work)."""
    if not sources:
        raise ValueError("draft-head data: no source given (use chat, stdlib or a .txt/.jsonl file)")
    for s in sources:
        if s in BUILTIN_SOURCES:
            continue
        p = Path(s)
        if not p.is_file() or p.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"draft-head data {s!r}: not one of {', '.join(BUILTIN_SOURCES)} and not an existing "
                             f".txt or .jsonl file")


def load_prompts(sources: Sequence[str], num_prompts: int, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """``num_prompts`` prompts drawn round-robin from the sources (each shuffled by ``seed``),
    without the ``exclude`` ones (e.g. a benchmark's held-out prompts)."""
    check_sources(sources)
    skip = set(exclude)
    pools = []
    for s in sources:
        pool = chat_prompts() if s == "chat" else stdlib_prompts() if s == "stdlib" else file_prompts(Path(s))
        pool = [p for p in pool if p not in skip]
        random.Random(f"{seed}:{s}").shuffle(pool)
        pools.append(pool)
    out: list[str] = []
    while len(out) < num_prompts and any(pools):
        for pool in pools:
            if pool and len(out) < num_prompts:
                out.append(pool.pop())
    return out


def generate_samples(target: str, prompts: Sequence[str], *, max_new_tokens: int, temperature: float, seed: int,
                     dtype: str, max_num_seqs: int = 32) -> list[Sample]:
    """The target's answers to ``prompts`` (chat template), in prompt order. Sampled runs are
    deterministic: request i draws from seed ``seed + i``."""
    from fleetlm import LLM, SamplingParams

    llm = LLM(target, dtype=dtype, max_num_seqs=max_num_seqs, seed=seed, enable_prefix_caching=False,
              kv_cache_memory=512 << 20)
    try:
        params = [SamplingParams(temperature=temperature, max_tokens=max_new_tokens,
                                 seed=None if temperature == 0 else seed + i) for i in range(len(prompts))]
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    finally:
        llm.shutdown()
    samples = []
    for o in outs:
        answer = list(o.outputs[0].token_ids)
        if len(answer) >= 2:
            samples.append(Sample(tuple(o.prompt_token_ids) + tuple(answer), len(o.prompt_token_ids)))
    return samples


@dataclass
class Target:
    """The target in plain (training) mode, frozen: what features, embeddings and the LM head come from."""

    model: torch.nn.Module
    config: object  # ModelConfig
    dtype: torch.dtype

    @torch.no_grad()
    def features(self, samples: Sequence[Sample], batch: int = 8) -> list[torch.Tensor]:
        """Final normed hidden states [len, H] (float32) of each sample, batched by length
        (right padding: causal attention keeps padded positions out of the real ones)."""
        order = sorted(range(len(samples)), key=lambda i: len(samples[i].tokens))
        out: list[torch.Tensor | None] = [None] * len(samples)
        for b in range(0, len(order), batch):
            idx = order[b : b + batch]
            t = max(len(samples[i].tokens) for i in idx)
            ids = torch.zeros(len(idx), t, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(samples[i].tokens)] = torch.tensor(samples[i].tokens)
            h = self.model(ids).float()
            for r, i in enumerate(idx):
                out[i] = h[r, : len(samples[i].tokens)].clone()
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def teacher_topk(self, feats: Sequence[torch.Tensor], k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample, the target's top-``k`` tokens at every position and their log-probabilities
        (normalised over the whole vocabulary): ids int32 [len, k], log-probs float32 [len, k]."""
        out = []
        for f in feats:
            logp = torch.log_softmax(self.logits(f.to(self.dtype)), -1)
            top = logp.topk(k, -1)
            out.append((top.indices.int(), top.values.float()))
        return out

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids).float()

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.model.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head.compute_logits(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], -1)


def load_target(target: str, dtype: torch.dtype, max_positions: int = 4096) -> Target:
    """The target's weights in the plain model class, no gradients (the head trains, the target does not)."""
    from fleetlm.models.hub import resolve_model
    from fleetlm.models.loader import load_model_files
    from fleetlm.models.registry import get_model_class

    files = load_model_files(resolve_model(target), dtype)
    with torch.device("cpu"):
        model = get_model_class(files.config.architecture)(files.config, dtype, max_positions)
    model.load_weights(files.weights)
    model.requires_grad_(False).eval()
    return Target(model, files.config, dtype)
