"""QLoRA: ``model.quantization`` freezes the base weights in int4 (or int8) and trains LoRA
adapters over them. Loss falls, only adapters train, the base stays quantized; the saved adapter
served over the same quantized base (``LLM(quantization="int4", lora_modules=...)``) gives the
trainer's logits; the configurations QLoRA cannot run are refused before any step."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import make_tiny_hf_dir

ALL = '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'


def _cfg(base, *extra):
    from fleetlm.train.config import load_config

    return load_config(None, [f'model.path="{base}"', "data.max_files=2", "data.seq_len=32", "data.max_tokens=65",
                              "training.steps=6", "training.micro_batch=2", "optimizer.lr=1e-2",
                              "logging.progress=false", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from fleetlm.train.trainer import train

    tmp = tmp_path_factory.mktemp("qlora")
    base = make_tiny_hf_dir(tmp / "base", initializer_range=0.2)
    cfg = _cfg(base, 'model.quantization="int4"', "lora.r=4", "lora.alpha=8", f"lora.target_modules={ALL}",
               f'lora.save_dir="{tmp / "adapter"}"')
    return base, tmp / "adapter", train(cfg)


def test_adapters_train_over_a_frozen_int4_base(trained):
    _, _, r = trained
    lm = r.trainer.root.lm
    assert [n for n, _ in r.trainer.named] and all(".lora." in n for n, _ in r.trainer.named)
    assert r.losses[-1] < r.losses[0]
    down = lm.model.layers[0].mlp.down_proj
    assert hasattr(down, "nibbles") and not any(p.numel() for p in down.parameters(recurse=False))
    assert all(float(p.detach().abs().max()) > 0 for n, p in lm.named_parameters() if ".lora.B." in n)


def test_the_adapter_served_over_the_same_int4_base_gives_the_trainers_logits(trained):
    from fleetlm import LLM, SamplingParams
    from fleetlm.train.loss import head_logits

    base, adapter, r = trained
    ids = torch.randint(0, 49152, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = torch.log_softmax(head_logits(r.trainer.root.lm.lm_head, r.trainer.root.lm(ids)).float(), -1)[0]
    from fleetlm.lora import LoRARequest

    with LLM(str(base), dtype="float32", quantization="int4", enable_lora=True, kv_cache_memory=8 << 20) as llm:
        out = llm.generate([{"prompt_token_ids": ids[0].tolist()}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           lora_request=LoRARequest("q", 1, str(adapter)), use_tqdm=False)[0]
    got = [next(iter(e.values())).logprob for e in out.prompt_logprobs[1:]]
    ref = [float(want[i, t]) for i, t in enumerate(ids[0, 1:].tolist())]
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-3
    assert all(math.isfinite(x) for x in got)


@pytest.mark.parametrize("extra, message", [
    (['model.quantization="int4"'], "set lora.r > 0"),
    (['model.quantization="w8a8"', "lora.r=4"], "model.quantization = 'w8a8'; accepted values"),
    (['model.quantization="int4"', "lora.r=4", "parallelism.dp_shard=2"], "one process or with parallelism.dp_replicate"),
])
def test_what_qlora_cannot_run_is_refused_before_a_step(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):  # load_config checks the whole config
        _cfg(tmp_path, *extra)
