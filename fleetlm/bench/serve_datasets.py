"""Request sets for ``fleetlm bench serve``: random, shared-prefix and JSONL.

``random`` and ``shared-prefix`` prompts are lists of token ids, sent as the ``prompt`` of
``/v1/completions`` (OpenAI accepts a list of ints), so their lengths are exact. Every request
(every prefix group for ``shared-prefix``) starts with its own token, so no two share a
prefix-cache block unless the dataset says they should.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VOCAB_LOW, VOCAB_HIGH = 1000, 40000  # ordinary tokens of SmolLM2's vocabulary (as throughput.py)


@dataclass(frozen=True)
class SampleRequest:
    prompt: str | list[int]
    prompt_len: int | None  # None: unknown here (text without --tokenizer); the server's count is used
    output_len: int


def load_tokenizer(name: str) -> Any:
    """A fleetlm ``Tokenizer`` from a GGUF file, an HF directory or an alias, without the weights."""
    from fleetlm.models.hub import resolve_model
    from fleetlm.models.tokenizer import tokenizer_from_gguf_fields, tokenizer_from_hf_dir

    path = resolve_model(name)
    if path.is_dir():
        cfg = path / "config.json"
        return tokenizer_from_hf_dir(path, json.loads(cfg.read_text()) if cfg.exists() else {})
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"--tokenizer {name!r}: {path} is neither a GGUF file nor an HF directory")
    import gguf

    from fleetlm.models.loader import gguf_fields

    return tokenizer_from_gguf_fields(gguf_fields(gguf.GGUFReader(str(path))))


def token_pool(tokenizer: Any | None) -> np.ndarray:
    """Ids to draw random prompts from: 1000..40000 by default, else the tokenizer's ordinary
    (non-special) ids from 1000 up (from 0 for a vocabulary under 2000)."""
    if tokenizer is None:
        return np.arange(VOCAB_LOW, VOCAB_HIGH, dtype=np.int64)
    vocab = int(tokenizer.vocab_size)
    special = set(tokenizer.backend.get_added_tokens_decoder())
    special |= {i for i in (tokenizer.bos_token_id, *tokenizer.eos_token_ids) if i is not None}
    low = VOCAB_LOW if vocab > 2 * VOCAB_LOW else 0
    ids = np.array([i for i in range(low, vocab) if i not in special], dtype=np.int64)
    if len(ids) == 0:
        raise ValueError("the tokenizer has no ordinary token ids to build random prompts from")
    return ids


def _lengths(rng: np.random.Generator, n: int, length: int, ratio: float) -> np.ndarray:
    lo, hi = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return rng.integers(lo, hi + 1, n)


def _prompts(rng: np.random.Generator, pool: np.ndarray, lens: list[int]) -> list[list[int]]:
    """One prompt per length; prompt i starts with pool[(offset + i) % len(pool)], so the first
    tokens differ for up to len(pool) prompts; the rest is uniform over the pool."""
    offset = int(rng.integers(len(pool)))
    out = []
    for i, n in enumerate(lens):
        rest = pool[rng.integers(0, len(pool), int(n) - 1)] if n > 1 else pool[:0]
        out.append([int(pool[(offset + i) % len(pool)])] + rest.tolist())
    return out


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    seed: int = 0, pool: np.ndarray | None = None) -> list[SampleRequest]:
    """``num`` prompts of random token ids; lengths uniform in [L(1-r), L(1+r)] (exact when r=0)."""
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    pool = token_pool(None) if pool is None else pool
    rng = np.random.default_rng(seed)
    in_lens = _lengths(rng, num, input_len, range_ratio).tolist()
    out_lens = _lengths(rng, num, output_len, range_ratio).tolist()
    prompts = _prompts(rng, pool, in_lens)
    return [SampleRequest(p, len(p), int(o)) for p, o in zip(prompts, out_lens)]


def shared_prefix_requests(num: int, prefix_len: int, suffix_len: int, num_prefixes: int,
                           output_len: int, seed: int = 0, pool: np.ndarray | None = None) -> list[SampleRequest]:
    """``num_prefixes`` groups, each a random prefix of ``prefix_len`` tokens; request i takes
    group ``i % num_prefixes`` plus ``suffix_len`` random tokens of its own."""
    if prefix_len < 0 or suffix_len < 0 or prefix_len + suffix_len < 1:
        raise ValueError("--shared-prefix-len and --suffix-len must be >= 0 with a sum >= 1")
    if num_prefixes < 1 or output_len < 1:
        raise ValueError("--num-prefixes and the output length must be >= 1")
    pool = token_pool(None) if pool is None else pool
    rng = np.random.default_rng(seed)
    prefixes = _prompts(rng, pool, [prefix_len] * num_prefixes) if prefix_len else [[]] * num_prefixes
    out = []
    for i in range(num):
        suffix = pool[rng.integers(0, len(pool), suffix_len)].tolist()
        prompt = prefixes[i % num_prefixes] + suffix
        out.append(SampleRequest(prompt, len(prompt), output_len))
    return out


def jsonl_requests(path: str, num: int | None, default_output_len: int,
                   tokenizer: Any | None = None) -> list[SampleRequest]:
    """One JSON object per line: ``prompt`` (a string or a list of token ids) and optionally
    ``max_tokens`` or ``output_len``. Input lengths of text prompts come from ``tokenizer``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--dataset-path {path!r} is not a file")
    out: list[SampleRequest] = []
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if num is not None and len(out) >= num:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            is_ids = isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)
            if not (isinstance(prompt, str) and prompt) and not is_ids:
                raise ValueError(f"{path}:{lineno}: needs a non-empty 'prompt' (a string or a list of token ids)")
            olen = obj.get("max_tokens", obj.get("output_len", default_output_len))
            if type(olen) is not int or olen < 1:
                raise ValueError(f"{path}:{lineno}: max_tokens/output_len must be an integer >= 1, got {olen!r}")
            if is_ids:
                plen: int | None = len(prompt)
            else:
                plen = len(tokenizer.encode(prompt)) if tokenizer is not None else None
            out.append(SampleRequest(prompt, plen, olen))
    if not out:
        raise ValueError(f"{path} holds no requests")
    return out


def build_requests(args: Any, tokenizer: Any | None = None) -> list[SampleRequest]:
    """The request set the command line asks for (``--dataset-name`` and its options)."""
    name = args.dataset_name
    num = args.num_prompts
    if num is not None and num < 1:
        raise ValueError("--num-prompts must be >= 1")
    if name == "jsonl":
        if not args.dataset_path:
            raise ValueError("--dataset-name jsonl needs --dataset-path FILE.jsonl")
        return jsonl_requests(args.dataset_path, num, args.random_output_len, tokenizer)
    num = 1000 if num is None else num
    pool = token_pool(tokenizer)
    if name == "random":
        return random_requests(num, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.seed, pool)
    if name == "shared-prefix":
        return shared_prefix_requests(num, args.shared_prefix_len, args.suffix_len,
                                      args.num_prefixes, args.random_output_len, args.seed, pool)
    raise ValueError(f"unknown dataset {name!r}; choose random, shared-prefix or jsonl")


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send times (s from the start) of ``n`` requests: the first at 0, then gaps drawn from a
    gamma distribution of mean 1/rate (shape ``burstiness``; 1 = Poisson). Rate inf: all at 0."""
    if n <= 0 or math.isinf(request_rate):
        return np.zeros(max(n, 0))
    rng = np.random.default_rng((seed, 0xA11))
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])
