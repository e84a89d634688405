"""LoRA on the model's fused parallel layers, saved in the PEFT layout: PEFT loads our adapter
onto the transformers model and gives the logits of our model with it; our loader reads it
back; an adapter for another base model is refused, naming the tensor."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import make_tiny_hf_dir

ALL = '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from fleetlm.train.config import load_config
    from fleetlm.train.trainer import train

    tmp = tmp_path_factory.mktemp("lora")
    base = make_tiny_hf_dir(tmp / "base", initializer_range=0.2)
    cfg = load_config(None, [f'model.path="{base}"', "data.max_files=2", "data.seq_len=32", "data.max_tokens=65", "training.steps=4",
                             "training.micro_batch=2", "optimizer.lr=1e-2", "logging.progress=false",
                             "lora.r=4", "lora.alpha=8", f"lora.target_modules={ALL}",
                             f'lora.save_dir="{tmp / "adapter"}"'])
    return base, tmp / "adapter", train(cfg)


def _our_logits(model, ids):
    from fleetlm.train.loss import head_logits

    with torch.no_grad():
        return head_logits(model.lm_head, model(ids)).float()


def test_only_the_adapter_trains(trained):
    base, _, r = trained
    lm = r.trainer.root.lm
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n for n in trainable)
    assert r.losses[-1] < r.losses[0]  # the same two sequences every step (max_tokens)
    assert all(float(p.detach().abs().max()) > 0 for n, p in lm.named_parameters() if ".lora.B." in n)  # B moved off 0
    from safetensors.torch import load_file

    w = load_file(str(base / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    torch.testing.assert_close(lm.model.layers[0].mlp.down_proj.weight, w, rtol=0, atol=0)


def test_peft_loads_our_adapter_with_the_same_logits(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, r = trained
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    ids = torch.randint(0, 49152, (2, 19), generator=torch.Generator().manual_seed(1))
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        ref, without = hf(ids).logits, plain(ids).logits
    ours = _our_logits(r.trainer.root.lm, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ref - without).abs().max() > 1e-2  # the adapter changes the logits


def _fresh(path):
    from fleetlm.models.loader import load_model_files
    from fleetlm.models.registry import build_model

    files = load_model_files(path, torch.float32)
    return build_model(files, torch.float32, 256).eval()


def test_our_loader_reads_the_adapter_back(trained):
    from fleetlm.layers.lora import load_peft_adapter

    base, adapter, r = trained
    model = _fresh(base)
    load_peft_adapter(model, adapter)
    ids = torch.randint(0, 49152, (1, 11), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_our_logits(model, ids), _our_logits(r.trainer.root.lm, ids), rtol=1e-5, atol=1e-5)


def test_an_adapter_for_another_base_model_is_refused(trained, tmp_path):
    from fleetlm.layers.lora import load_peft_adapter

    _, adapter, _ = trained
    other = _fresh(make_tiny_hf_dir(tmp_path / "other", hidden_size=32, intermediate_size=64))
    with pytest.raises(ValueError, match=r"lora_A.weight' has shape \(4, \d+\), this model needs \(4, \d+\): an adapter for another base model"):
        load_peft_adapter(other, adapter)
