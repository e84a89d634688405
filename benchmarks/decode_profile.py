"""Where a batch-1 decode token goes (issue 17): wall time of 128 greedy tokens from the default
SmolLM2 GGUF (Q4_1 layers, Q8_0 head, bf16 activations), with the int4 matmuls and the head's
kernel timed in place (perf_counter around each call; the engine is otherwise untouched).

    python benchmarks/decode_profile.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

from fleetlm import LLM, SamplingParams  # before torch: fleetlm's OpenMP settings apply

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class Timed:
    """Forwards attribute access; the named callables are timed into ``acc``."""

    def __init__(self, target, names: tuple[str, ...], acc: dict) -> None:
        self.target, self.names, self.acc = target, names, acc

    def __getattr__(self, name: str):
        f = getattr(self.target, name)
        if name not in self.names:
            return f

        def timed(*args):
            start = time.perf_counter()
            out = f(*args)
            self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - start
            return out

        return timed


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    acc: dict[str, float] = {}
    llm = LLM("smollm2-135m-instruct", dtype="bfloat16", kv_cache_memory=256 << 20, max_num_seqs=1)
    torch_timed = Timed(torch, ("_weight_int4pack_mm_for_cpu",), acc)
    import fleetlm.quantization.int4 as int4

    int4.torch = torch_timed  # the int4 method's module-level torch
    model = llm.engine.core.executor.worker.runner.model
    for m in model.modules():  # the Q8_0 head's compiled kernel
        if hasattr(m, "kernel") and m.kernel is not None and hasattr(m.kernel, "int8_group_linear"):
            m.kernel = Timed(m.kernel, ("int8_group_linear", "paged_decode"), acc)
    backend = llm.engine.core.executor.worker.runner.backend
    if hasattr(backend, "kernel"):
        backend.kernel = Timed(backend.kernel, ("paged_decode",), acc)
    sp = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    llm.generate([PROMPT], sp, use_tqdm=False)
    for _ in range(args.rounds):
        acc.clear()
        start = time.perf_counter()
        m = llm.generate([PROMPT], sp, use_tqdm=False)[0].metrics
        wall = time.perf_counter() - start
        parts = ", ".join(f"{k} {v / 128 * 1e3:.2f} ms ({100 * v / wall:.0f}%)" for k, v in sorted(acc.items()))
        print(f"{127 / (m.finished_time - m.first_token_time):.1f} tok/s, {wall / 128 * 1e3:.2f} ms a token: {parts}")


if __name__ == "__main__":
    main()
