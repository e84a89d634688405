"""Shared fixtures. Real-model fixtures are session-scoped: the model loads once per run."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session")
def model_path():
    from fleetlm.models.hub import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def llm_fp32():
    from fleetlm import LLM

    return LLM(dtype="float32", kv_cache_memory=256 << 20)


@pytest.fixture(scope="session")
def hf_model(model_path):
    """The reference: Hugging Face transformers' own GGUF loader and Llama code, fp32."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    return m.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tests.helpers import make_tiny_hf_dir

    return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny_llama"))
