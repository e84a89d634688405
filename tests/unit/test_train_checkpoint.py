"""Checkpoints: resuming gives the same next losses as an uninterrupted run (also when the
checkpoint was written by 2 FSDP2 ranks and is read by one process); a checkpoint of another
model is refused before any step; the exported Hugging Face directory loads in transformers and
in the engine (``LLM``) with the trained model's logits."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_train_parallel import run_ranks, train_once

FOUR = ["training.steps=4", "training.micro_batch=4"]


@pytest.fixture(scope="module")
def uninterrupted():
    return train_once(FOUR)


def _ck(tmp_path, *extra: str) -> list[str]:
    return [f'checkpoint.dir="{tmp_path / "ck"}"', *extra]


def test_resume_gives_the_same_next_losses(uninterrupted, tmp_path):
    first = train_once(["training.steps=2", "training.micro_batch=4", *_ck(tmp_path, "checkpoint.every=2")])
    assert (tmp_path / "ck" / "step-2" / "fleetlm_train.json").exists()
    resumed = train_once([*FOUR, *_ck(tmp_path, "checkpoint.resume=true")])
    torch.testing.assert_close(torch.tensor(first[0] + resumed[0]), torch.tensor(uninterrupted[0]), rtol=1e-6, atol=1e-6)
    for name, p in uninterrupted[2].items():
        torch.testing.assert_close(resumed[2][name], p, rtol=0, atol=1e-6, msg=name)


def test_fsdp2_checkpoint_resumes_in_one_process(uninterrupted, tmp_path):
    run_ranks(2, ["training.steps=2", "training.micro_batch=2", "parallelism.dp_shard=2",
                  *_ck(tmp_path, "checkpoint.every=2")], tmp_path)
    resumed = train_once([*FOUR, *_ck(tmp_path, "checkpoint.resume=true")])
    torch.testing.assert_close(torch.tensor(resumed[0]), torch.tensor(uninterrupted[0][2:]), rtol=2e-5, atol=2e-6)


def test_checkpoint_of_another_model_is_refused_before_a_step(tmp_path):
    train_once(["training.steps=1", "training.micro_batch=2", *_ck(tmp_path)])
    with pytest.raises(ValueError, match="another model: .*num_hidden_layers"):
        train_once(['model.size="small"', "training.steps=2", *_ck(tmp_path, "checkpoint.resume=true")])


def test_export_loads_in_transformers_and_the_engine_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from fleetlm.engine.llm import LLM
    from fleetlm.sampling_params import SamplingParams
    from fleetlm.train.config import load_config
    from fleetlm.train.trainer import train
    from tests.unit.test_train_parallel import BASE

    out = tmp_path / "hf"
    r = train(load_config(None, [*BASE, "training.steps=3", "training.micro_batch=2", f'checkpoint.export_hf="{out}"']))
    ids = torch.tensor([r.trainer.dataset.window(0)[:24].tolist()])
    root = r.trainer.root
    with torch.no_grad():
        from fleetlm.train.loss import head_logits

        ours = head_logits(root.lm.lm_head, root.lm(ids)).float()
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ref = hf(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)

    llm = LLM(str(out), dtype="float32", device="cpu", kv_cache_memory=1 << 24, max_model_len=64)
    res = llm.generate([{"prompt_token_ids": ids[0].tolist()}], SamplingParams(max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    want = torch.log_softmax(ref[0].double(), -1)
    for pos in range(1, ids.shape[1]):
        tok = int(ids[0, pos])
        assert abs(res.prompt_logprobs[pos][tok].logprob - float(want[pos - 1, tok])) < 1e-4, pos
