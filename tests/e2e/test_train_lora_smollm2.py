"""LoRA on SmolLM2-135M (the real model, dequantised to float32): the loss on a small fixed
corpus falls in a few steps, only the adapter moves, and the saved adapter reloads onto a fresh
model with the trained model's logits."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_lora_on_smollm2_lowers_the_loss(tmp_path):
    from fleetlm.layers.lora import load_peft_adapter
    from fleetlm.models.hub import resolve_model
    from fleetlm.models.loader import load_model_files
    from fleetlm.models.registry import build_model
    from fleetlm.train.config import load_config
    from fleetlm.train.loss import head_logits
    from fleetlm.train.trainer import train

    lines = [f"The secret code of {n} is {c}." for n, c in [("Alice", 4721), ("Bruno", 1380), ("Chen", 9052),
                                                              ("Dara", 6617)]]
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    cfg = load_config(None, [
        'model.path="smollm2-135m-instruct"', f'data.paths=["{tmp_path / "facts.jsonl"}"]',
        'data.format="jsonl"', "data.seq_len=16", "training.steps=5", "training.micro_batch=2",
        "optimizer.lr=3e-3", "optimizer.weight_decay=0.0", "logging.progress=false", "lora.r=8",
        f'lora.save_dir="{tmp_path / "adapter"}"'])
    r = train(cfg)
    assert r.losses[-1] < r.losses[0] - 0.3, r.losses
    lm = r.trainer.root.lm
    files = load_model_files(resolve_model("smollm2-135m-instruct"), torch.float32)
    fresh = build_model(files, torch.float32, 256).eval()
    load_peft_adapter(fresh, tmp_path / "adapter")
    ids = torch.tensor([r.trainer.dataset.window(0).tolist()])
    with torch.no_grad():
        torch.testing.assert_close(head_logits(fresh.lm_head, fresh(ids)), head_logits(lm.lm_head, lm(ids)),
                                   rtol=1e-4, atol=1e-4)
