"""Weight bytes the engine holds per quantization format equal the planner's
(``fleetlm.plan.quant_bytes``): linear layers, embedding and LM head, tied and untied."""

from __future__ import annotations

import json

import pytest
import torch

from fleetlm.layers.linear import LinearBase
from fleetlm.plan.quant_bytes import Dims, engine_weight_bytes
from fleetlm.quantization.base import int8_activation_kernels


def measured_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every linear layer's tensors (bias excluded), the embedding and the LM head,
    shared tensors once."""
    seen, total = set(), 0
    mods = [m for m in model.modules() if isinstance(m, LinearBase)]
    mods += [model.model.embed_tokens, model.lm_head]
    for m in mods:
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if name == "bias" or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def dims(path) -> Dims:
    c = json.loads((path / "config.json").read_text())
    heads = c["num_attention_heads"]
    return Dims(c["hidden_size"], c["intermediate_size"], heads, c["num_key_value_heads"],
                c["hidden_size"] // heads, c["num_hidden_layers"], c["vocab_size"], c["tie_word_embeddings"])


@pytest.mark.parametrize("quantization", [None, "int8", "int4_g32", "w8a8"])
def test_engine_weight_bytes_equal_the_planners(tiny_model_dir, quantization):
    from fleetlm import LLM

    llm = LLM(str(tiny_model_dir), dtype="bfloat16", kv_cache_memory=4 << 20, quantization=quantization)
    model = llm.engine.core.executor.worker.runner.model
    assert measured_weight_bytes(model) == engine_weight_bytes(dims(tiny_model_dir), quantization or "none", 2,
                                                                 int4_q8=int8_activation_kernels() is not None)
