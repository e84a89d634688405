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


def _prefix_sharing_case(tiny_model_dir, monkeypatch, **engine_kw):
    """R = P + [poison] writes P's blocks and H = P + [5] hits them in the same step; the step
    fails, so those blocks were never written: H must recompute them, not read garbage."""
    poison = 999
    prefix = list(range(300, 332))  # two full blocks of 16
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    hitter = {"prompt_token_ids": prefix + [5]}
    with LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=64, **engine_kw) as clean:
        expected = clean.generate([hitter], sp, use_tqdm=False)[0].outputs[0].token_ids
    monkeypatch.setenv(FAULT_ENV, str(poison))
    with LLM(str(tiny_model_dir), dtype="float32", num_kv_blocks=64, **engine_kw) as llm:
        outs = llm.generate([{"prompt_token_ids": prefix + [poison]}, hitter], sp, use_tqdm=False)
        assert outs[0].outputs[0].finish_reason == "error"
        assert outs[1].outputs[0].token_ids == expected
        sched = llm.engine.core.scheduler
        assert sched.kv.num_free_blocks == sched.cache_config.num_blocks


def test_a_request_that_hit_blocks_of_the_failed_step_recomputes_them(tiny_model_dir, monkeypatch):
    _prefix_sharing_case(tiny_model_dir, monkeypatch)


def test_failed_step_on_every_rank_is_retried_per_request_with_tp2(tiny_model_dir, monkeypatch):
    """Several ranks: the fault raises on every rank before any collective (a StepError), the
    engine retries per request and goes on; workers see the same env and the same steps."""
    _prefix_sharing_case(tiny_model_dir, monkeypatch, tensor_parallel_size=2)
