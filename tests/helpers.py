"""Test helpers: tiny random-weight models and a Hugging Face greedy reference."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_hf_dir(out: Path, *, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random-weight HF model directory (config.json, safetensors, tokenizer.json) whose
    tokenizer is SmolLM2's, so text prompts work."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from fleetlm.models.hub import resolve_model
    from fleetlm.models.loader import gguf_fields
    from fleetlm.models.tokenizer import tokenizer_from_gguf_fields

    torch.manual_seed(seed)
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(out, safe_serialization=True)
    import gguf

    fields = gguf_fields(gguf.GGUFReader(str(resolve_model("smollm2-135m-instruct"))))
    tok = tokenizer_from_gguf_fields(fields)
    tok.backend.save(str(out / "tokenizer.json"))
    import json

    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tok.chat_template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    return out


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """Greedy continuation from transformers (stops at EOS like the engine, EOS included)."""
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=eos_token_id, pad_token_id=eos_token_id if eos_token_id is not None else 0,
    )
    return out[0, len(prompt_ids):].tolist()
