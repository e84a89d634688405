"""Quantization formats on SmolLM2-135M (the default GGUF, Q4_1 as shipped): perplexity on a
fixed held-out text (tests/data/heldout_cc0.txt, public domain) and greedy agreement with bf16,
each pinned within a stated margin of the bf16 baseline (the same GGUF dequantized to bf16);
weight bytes equal to the planner's; the GGUF-kept format under preemption.

Measured on this machine (see docs/QUANTIZATION.md): perplexity bf16 / gguf-kept / int8 / int4.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fleetlm import LLM, SamplingParams

pytestmark = pytest.mark.slow
TEXT = (Path(__file__).parents[1] / "data" / "heldout_cc0.txt").read_text()
MODEL = "smollm2-135m-instruct"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "List three prime numbers.", "Who wrote Hamlet?", "Translate 'good morning' to Spanish.",
           "What is 12 times 7?", "Describe a cat in one sentence."]
FORMATS = {"bf16": "dequantize", "gguf": None, "int8": "int8", "int4": "int4"}
# perplexity may rise by at most this fraction over bf16; greedy agreement (mean fraction of the
# 32 tokens before the first difference) at least this
PPL_MARGIN = {"gguf": 0.01, "int8": 0.03, "int4": 0.15}
AGREE_MIN = {"gguf": 0.7, "int8": 0.5, "int4": 0.2}


def perplexity(llm: LLM) -> float:
    ids = llm.get_tokenizer().encode(TEXT)[:1024]
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    lps = [next(iter(e.values())).logprob for e in out.prompt_logprobs[1:]]
    return math.exp(-sum(lps) / len(lps))


def greedy(llm: LLM) -> list[list[int]]:
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.chat(chats, sp, use_tqdm=False)]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    def prefix(x, y):
        return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))

    return sum(prefix(x, y) / len(x) for x, y in zip(a, b)) / len(a)


@pytest.fixture(scope="module")
def measured():
    out = {}
    for name, q in FORMATS.items():
        with LLM(MODEL, dtype="bfloat16", kv_cache_memory=256 << 20, quantization=q) as llm:
            out[name] = (perplexity(llm), greedy(llm))
    print({k: round(v[0], 3) for k, v in out.items()})
    return out


@pytest.mark.parametrize("fmt", ["gguf", "int8", "int4"])
def test_perplexity_and_greedy_agreement_within_margin_of_bf16(measured, fmt):
    ppl_bf16, toks_bf16 = measured["bf16"]
    ppl, toks = measured[fmt]
    agree = agreement(toks, toks_bf16)
    print(f"{fmt}: ppl {ppl:.3f} vs bf16 {ppl_bf16:.3f}; greedy agreement {agree:.2f}")
    assert ppl <= ppl_bf16 * (1 + PPL_MARGIN[fmt])
    assert agree >= AGREE_MIN[fmt]
