"""What rounding decode activations to int8 costs (issue 17): the int4 x int8 and int8 x int8
kernels (``csrc/int4_q8.cpp``, ``csrc/int8_q8.cpp``) against the same weights with bf16
activations, on the shipped SmolLM2 GGUF (Q4_1 layers, Q8_0 head) or another GGUF (``--model``).

1. Perplexity of a fixed English text (Python's own LICENSE.txt, its first 2,048 tokens), read in
   prefill chunks of 8 tokens so that every int4 matmul has 8 rows, the kernel's regime
   (``max_num_batched_tokens=8``): with the kernel, and with it switched off in the same engine
   (the layers then dequantize and use the bf16 GEMM; same weights, bf16 activations). The dense
   bf16 model (``quantization="dequantize"``) is the third column, for scale.
2. Greedy decoding, 24 chat prompts x 128 tokens: how many outputs are identical with and without
   the kernel, and where the others first differ. For scale, the same count between bf16
   activations and the dense bf16 model.

    python benchmarks/int8_activations_accuracy.py [--model PATH.gguf]

Needs an AVX512-VNNI machine (without one the kernel is never used and there is nothing to compare).
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
from pathlib import Path

from fleetlm import LLM, SamplingParams  # before torch: fleetlm's OpenMP settings apply

PROMPTS = Path(__file__).resolve().parents[1] / "fleetlm" / "train" / "data" / "chat_prompts.json"


def chat_prompts(n: int) -> list[str]:
    data = json.loads(PROMPTS.read_text())
    subjects = data["subjects"]
    return [t.format(s=subjects[i % len(subjects)]) for i, t in enumerate(data["templates"] * 3)][:n]


def switch_kernel(llm: LLM, on: bool, saved: dict) -> None:
    """Detach (or restore) every quantized layer's int8-activation kernel."""
    for module in llm.engine.core.executor.worker.runner.model.modules():
        if on and module in saved:
            module.q8_kernel = saved.pop(module)
        elif not on and hasattr(module, "q8_kernel"):
            saved[module] = module.__dict__.pop("q8_kernel")


def perplexity(llm: LLM, tokens: list[int]) -> float:
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    out = llm.generate([{"prompt_token_ids": tokens}], sp, use_tqdm=False)[0]
    lps = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
    return math.exp(-sum(lps) / len(lps))


def greedy(llm: LLM, prompts: list[str]) -> list[list[int]]:
    sp = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    firsts = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(a, b)]
    differ = sorted(f for f in firsts if f is not None)
    return f"{len(a) - len(differ)}/{len(a)} identical; the others first differ at tokens {differ}"


def main() -> None:
    from fleetlm.quantization.base import int8_activation_kernels

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    model = ap.parse_args().model
    if int8_activation_kernels() is None:
        raise SystemExit("no AVX512-VNNI here: the int8-activation kernels are not used on this machine")
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    common = dict(dtype="bfloat16", kv_cache_memory=512 << 20, enable_prefix_caching=False)
    llm = LLM(model, max_num_batched_tokens=8, **common)
    tokens = llm.get_tokenizer().encode(text)[:2048]
    saved: dict = {}
    ppl_q8 = perplexity(llm, tokens)
    switch_kernel(llm, False, saved)
    ppl_bf16_act = perplexity(llm, tokens)
    switch_kernel(llm, True, saved)
    dense = LLM(model, max_num_batched_tokens=8, quantization="dequantize", **common)
    ppl_dense = perplexity(dense, tokens)
    print(f"perplexity of LICENSE.txt ({len(tokens)} tokens, chunks of 8): int8 activations {ppl_q8:.4f}, "
          f"bf16 activations {ppl_bf16_act:.4f}, dense bf16 {ppl_dense:.4f}")

    prompts = chat_prompts(24)
    with_kernel = greedy(llm, prompts)
    switch_kernel(llm, False, saved)
    without = greedy(llm, prompts)
    print(f"greedy, 24 prompts x 128 tokens, kernel vs bf16 activations: {agreement(with_kernel, without)}")
    print(f"greedy, bf16 activations vs the dense bf16 model: {agreement(without, greedy(dense, prompts))}")


if __name__ == "__main__":
    main()
