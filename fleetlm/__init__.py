"""fleetlm: serve and train large language models; CPU first, CUDA ready.

Offline use mirrors vLLM's API::

    from fleetlm import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    print(llm.generate(["Hi"], SamplingParams(max_tokens=8))[0].outputs[0].text)
"""

import os as _os

# Idle OpenMP threads spin briefly, then sleep (3000 spins), unless the user chose a policy.
# Measured (benchmarks/RESULTS.md, "Threads"): sleeping at once (OMP_WAIT_POLICY=PASSIVE) halved
# batch-1 decode, where every parallel region of a step paid a wake-up; spinning long collapsed
# when another busy process shared a 2-core machine; 3000 spins kept both. Only effective if set
# before torch is first imported.
# GOMP_SPINCOUNT is GNU OpenMP's (torch's Linux wheels); KMP_BLOCKTIME (ms) the same for Intel
# and LLVM OpenMP builds.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "3000")
    _os.environ.setdefault("KMP_BLOCKTIME", "1")

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):  # lazy: `import fleetlm` stays cheap (no torch) until needed
    if name == "LLM":
        from fleetlm.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from fleetlm.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from fleetlm import outputs

        return getattr(outputs, name)
    raise AttributeError(name)
