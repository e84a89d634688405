"""A request that makes the model step raise fails alone; the rest of its batch goes on."""

from __future__ import annotations

from fleetlm import LLM, SamplingParams
from fleetlm.worker.model_runner import FAULT_ENV


def test_poisoned_request_fails_alone_and_others_match_a_clean_run(tiny_model_dir, monkeypatch):
    poison = 777
    prompts = [{"prompt_token_ids": [100 + i, 200 + i, 300 + i, 400 + i]} for i in range(5)]
    bad = {"prompt_token_ids": [5, poison, 9]}
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    clean = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=64)
    expected = [o.outputs[0].token_ids for o in clean.generate(prompts, sp, use_tqdm=False)]

    monkeypatch.setenv(FAULT_ENV, str(poison))
    llm = LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=64)
    free = llm.engine.core.scheduler.kv.num_free_blocks
    outs = llm.generate(prompts[:2] + [bad] + prompts[2:], sp, use_tqdm=False)
    assert outs[2].error and "injected fault" in outs[2].error and outs[2].outputs[0].finish_reason == "error"
    good = [o.outputs[0].token_ids for i, o in enumerate(outs) if i != 2]
    assert good == expected
    assert llm.engine.core.num_failed_steps >= 1
    assert llm.engine.core.scheduler.kv.num_free_blocks == free
    again = llm.generate(prompts, sp, use_tqdm=False)  # the engine still serves
    assert [o.outputs[0].token_ids for o in again] == expected
