"""fleetlm: serve and train large language models; CPU first, CUDA ready.

Offline use mirrors vLLM's API::

    from fleetlm import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    print(llm.generate(["Hi"], SamplingParams(max_tokens=8))[0].outputs[0].text)
"""

import os as _os

# Idle OpenMP threads must sleep, not spin: a spinning pool collapses when another busy process
# shares a 2-core machine. Only effective if set before torch is first imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
