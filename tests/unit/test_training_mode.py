"""The serving model file in training mode: batched [B, T] input, causal SDPA (no paged
context), gradients. fp32 loss and every parameter's gradient equal transformers' on a tiny
random Llama (tied embeddings) and Qwen2 (attention bias)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import make_tiny_hf_dir

HF_TO_OURS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def _ours(path):
    from fleetlm.models.loader import load_model_files
    from fleetlm.models.registry import build_model

    files = load_model_files(path, torch.float32)
    model = build_model(files, torch.float32, files.config.max_position_embeddings)
    return model.requires_grad_(True).train()


def _our_grad(model, hf_name: str, hf_shape: torch.Size) -> torch.Tensor:
    """Our gradient for the Hugging Face parameter ``hf_name`` (a slice of a fused one)."""
    params = dict(model.named_parameters())
    for part, (fused, idx) in HF_TO_OURS.items():
        if f".{part}." in hf_name:
            sizes = _split_sizes(model, fused)
            return params[hf_name.replace(part, fused)].grad.narrow(0, sum(sizes[:idx]), sizes[idx])
    return params[hf_name].grad


def _split_sizes(model, fused: str) -> list[int]:
    c = model.config
    if fused == "qkv_proj":
        return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
    return [c.intermediate_size, c.intermediate_size]


@pytest.mark.parametrize("arch,kw", [("llama", {"tie_word_embeddings": True}), ("qwen2", {})], ids=["llama-tied", "qwen2"])
def test_loss_and_grads_equal_transformers(tmp_path, arch, kw):
    from transformers import AutoModelForCausalLM

    path = make_tiny_hf_dir(tmp_path, arch=arch, initializer_range=0.2, **kw)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    ours = _ours(path)
    ids = torch.randint(0, 49152, (3, 17), generator=torch.Generator().manual_seed(0))

    ref_loss = hf(ids, labels=ids).loss
    ref_loss.backward()
    hidden = ours(ids)  # [B, T, hidden]: no forward context, so plain causal attention
    logits = ours.lm_head(hidden)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    hf_params = dict(hf.named_parameters())  # tied: the head is the embedding, listed once
    for name, p in hf_params.items():
        torch.testing.assert_close(_our_grad(ours, name, p.shape), p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert len(hf_params) == 3 * 9 + 2 + (0 if kw else 1) + (3 * 3 if arch == "qwen2" else 0)  # q/k/v biases
