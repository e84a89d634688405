"""Where a batch-1 token of the shipped GGUF goes (issue 17): the whole step, then with its parts
removed in turn from one loaded engine (the int4 matmuls, then the Q8_0 head (either kernel), then the decode
attention kernel, each replaced by a preallocated output), so each difference includes that part's
cache and thread effects. The tokens after the first removal are meaningless; only time counts.

    python benchmarks/decode_parts.py

128 greedy tokens from a short prompt, best of 3 per stage.
"""

from __future__ import annotations

from fleetlm import LLM, SamplingParams  # before torch: fleetlm's OpenMP settings apply


def main() -> None:
    import torch

    import fleetlm.quantization.int4 as int4

    llm = LLM("smollm2-135m-instruct", dtype="bfloat16", kv_cache_memory=256 << 20, max_num_seqs=1)
    sp = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    runner = llm.engine.core.executor.worker.runner

    def run(stage: str) -> None:
        best = 0.0
        for _ in range(3):
            m = llm.generate(["Write a short story about a lighthouse keeper."], sp, use_tqdm=False)[0].metrics
            best = max(best, 127 / (m.finished_time - m.first_token_time))
        print(f"{stage}: {best:.1f} tok/s = {1e3 / best:.2f} ms a token", flush=True)

    run("all")
    outputs: dict = {}

    def no_matmul(self, layer, x, bias):
        key = (tuple(x.shape[:-1]), layer.out_features)
        if key not in outputs:
            outputs[key] = torch.zeros(*x.shape[:-1], layer.out_features, dtype=x.dtype)
        return outputs[key]

    int4.Int4LinearMethod.apply = no_matmul
    run("without the int4 matmuls")

    class NoHead:  # the head's compiled ops, with its kernel replaced
        def __init__(self, ops) -> None:
            self.ops = ops

        def __getattr__(self, name: str):
            return getattr(self.ops, name)

        def int8_group_linear(self, x, q, s, group):
            return torch.zeros(x.shape[0], q.shape[0])

        def int8_q8_linear(self, x, q, s, group):
            return torch.zeros(x.shape[0], q.shape[0], dtype=x.dtype)

    for module in runner.model.modules():
        if getattr(module, "kernel", None) is not None and hasattr(module.kernel, "int8_group_linear"):
            module.kernel = NoHead(module.kernel)
            if getattr(module, "q8_kernel", None) is not None:
                module.q8_kernel = NoHead(module.q8_kernel)
    run("... and without the LM head")
    runner.backend._decode = lambda q, kv_cache, meta: q.clone()
    run("... and without the decode attention kernel")


if __name__ == "__main__":
    main()
