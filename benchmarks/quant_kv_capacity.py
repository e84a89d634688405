"""Users per machine per KV dtype (issue 14): the most concurrent 2,048-token sequences whose KV
fits a 2 GiB budget, from the engine's own block count (SmolLM2-135M, bf16, block size 16),
beside the planner's figure.

    python benchmarks/quant_kv_capacity.py
"""

from __future__ import annotations

from fleetlm import LLM
from fleetlm.plan.memory import kv_bytes_per_seq
from fleetlm.plan.model_catalog import catalog_model

BUDGET, SEQ, BS = 2 << 30, 2048, 16


def main() -> None:
    spec = catalog_model("smollm2-135m")
    for kv, plan_name in (("auto", "bf16"), ("int8", "int8"), ("fp8_e4m3", "fp8")):
        llm = LLM("smollm2-135m-instruct", dtype="bfloat16", kv_cache_memory=BUDGET, kv_cache_dtype=kv,
                  quantization="dequantize")
        worker = llm.engine.core.executor.worker
        blocks = worker.runner.kv_cache.shape[2]
        planned = BUDGET // kv_bytes_per_seq(spec, SEQ, plan_name, BS)
        print(f"kv {kv}: {worker.kv_bytes_per_token()} B/token, {blocks} blocks, "
              f"{blocks // (SEQ // BS)} sequences of {SEQ} tokens (planner: {planned})", flush=True)
        del llm, worker


if __name__ == "__main__":
    main()
