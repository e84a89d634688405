"""The offline API on the real model: prompt forms, n > 1, stop strings, logprobs, errors."""

import math

import pytest

from fleetlm import LLM, SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def test_string_and_token_id_prompts_agree(llm_fp32):
    tok = llm_fp32.get_tokenizer()
    a, b = llm_fp32.generate(["The capital of France is", {"prompt_token_ids": tok.encode("The capital of France is")}], GREEDY, use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.prompt == "The capital of France is" and a.prompt_token_ids == b.prompt_token_ids
    assert a.outputs[0].text == tok.decode(a.outputs[0].token_ids)
    assert a.outputs[0].finish_reason == "length" and len(a.outputs[0].token_ids) == 12
    m = a.metrics
    assert m.time_to_first_token is not None and 0 < m.time_to_first_token <= m.e2e_latency
    assert 0 <= m.time_in_queue <= m.time_to_first_token


def test_n_samples_share_the_prompt_and_seeds_reproduce(llm_fp32):
    sp = SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=10)
    first = llm_fp32.generate("Tell me a story", sp, use_tqdm=False)[0]
    again = llm_fp32.generate("Tell me a story", sp, use_tqdm=False)[0]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1


def test_stop_token_id_ends_the_text_without_itself(llm_fp32):
    free = llm_fp32.generate("The capital of France is", SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)[0].outputs[0]
    k = next(i for i in range(2, 20) if free.token_ids[i] not in free.token_ids[:i])  # first new id
    stop_id = free.token_ids[k]
    out = llm_fp32.generate("The capital of France is", SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.token_ids[: k + 1] and out.stop_reason == stop_id and out.finish_reason == "stop"
    tok = llm_fp32.get_tokenizer()
    assert out.text == tok.decode(free.token_ids[:k])


def test_stop_string_is_trimmed_and_reported(llm_fp32):
    free = llm_fp32.generate("The capital of France is", SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)[0].outputs[0]
    word = free.text.split()[1]  # a word that greedy decoding produces
    out = llm_fp32.generate("The capital of France is", SamplingParams(max_tokens=20, temperature=0, stop=[word]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == word
    assert word not in out.text and free.text.startswith(out.text)
    kept = llm_fp32.generate("The capital of France is", SamplingParams(max_tokens=20, temperature=0, stop=[word], include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text.endswith(word)


def test_eos_stops_unless_ignored(llm_fp32):
    eos = llm_fp32.get_tokenizer().eos_token_id
    chat = [{"role": "user", "content": "Say hi."}]
    out = llm_fp32.chat(chat, SamplingParams(max_tokens=64, temperature=0), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos
    assert "<|im_end|>" not in llm_fp32.chat(chat, SamplingParams(max_tokens=64, temperature=0, skip_special_tokens=False), use_tqdm=False)[0].outputs[0].text
    forced = llm_fp32.chat(chat, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(forced.token_ids) == 64 and forced.finish_reason == "length"
    longer = llm_fp32.chat(chat, SamplingParams(max_tokens=64, temperature=0, min_tokens=len(out.token_ids) + 2), use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= len(out.token_ids) + 2


def test_logprobs_and_prompt_logprobs(llm_fp32):
    out = llm_fp32.generate("The capital of France is", SamplingParams(max_tokens=5, temperature=0, logprobs=3, prompt_logprobs=2), use_tqdm=False)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 5
    for tok, pos in zip(c.token_ids, c.logprobs):
        assert pos[tok].rank == 1 and len(pos) == 3  # greedy: the sampled token is the top one
        assert pos[tok].decoded_token == llm_fp32.get_tokenizer().decode([tok], skip_special_tokens=False)
        assert all(lp.logprob <= 0 for lp in pos.values())
    assert math.isclose(c.cumulative_logprob, sum(p[t].logprob for t, p in zip(c.token_ids, c.logprobs)))
    pl = out.prompt_logprobs
    assert len(pl) == len(out.prompt_token_ids) and pl[0] is None
    for tok, pos in zip(out.prompt_token_ids[1:], pl[1:]):
        assert tok in pos and pos[tok].rank >= 1 and len(pos) <= 3


def test_chat_accepts_a_list_of_conversations(llm_fp32):
    convs = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "Say hello"}]]
    outs = llm_fp32.chat(convs, GREEDY, use_tqdm=False)
    assert len(outs) == 2 and "Paris" in outs[0].outputs[0].text
    assert outs[0].prompt.startswith("<|im_start|>system")


def test_bad_input_is_a_clear_error(llm_fp32):
    with pytest.raises(ValueError, match="empty"):
        llm_fp32.generate({"prompt_token_ids": []}, GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        llm_fp32.generate("hi", SamplingParams(max_tokens=10**6))
    with pytest.raises(ValueError, match="invalid token id"):
        llm_fp32.generate({"prompt_token_ids": [10**9]}, GREEDY)
    with pytest.raises(ValueError, match="sampling_params"):
        llm_fp32.generate(["a", "b"], [GREEDY] * 3)
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(dtype="float32", max_seqs=4)


def test_request_that_never_fits_fails_alone():
    llm = LLM(dtype="float32", num_kv_blocks=8, block_size=16)  # 128 tokens in all
    sp = SamplingParams(max_tokens=8, temperature=0)
    outs = llm.generate(["Hello", {"prompt_token_ids": [100] * 200}, "The sky is"], sp, use_tqdm=False)
    assert outs[1].error and "can never fit" in outs[1].error and outs[1].outputs[0].finish_reason == "error"
    assert len(outs[0].outputs[0].token_ids) == 8 and len(outs[2].outputs[0].token_ids) == 8
    assert llm.engine.core.scheduler.kv.num_free_blocks == 8


@pytest.mark.parametrize("kw,match", [
    ({"dtype": "float16"}, "float16 is not supported on the CPU"),
    ({"dtype": "int3"}, "dtype 'int3' is not supported"),
])
def test_engine_argument_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LLM(**kw)


def test_planner_kv_sizing_equals_the_engine_allocation(llm_fp32, model_path):
    """One source of truth: the planner's bytes per token and block count for SmolLM2 are what
    the running engine allocated (fp32 KV, 256 MiB budget)."""
    from fleetlm.plan import kv_cache_num_blocks, load_model_spec
    from fleetlm.plan.memory import kv_bytes_per_token

    spec = load_model_spec(str(model_path))
    per_token = kv_bytes_per_token(spec, "fp32")
    core = llm_fp32.engine.core
    assert core.cache_config.num_blocks == kv_cache_num_blocks(256 << 20, 16, per_token)
    cache = core.executor.worker.runner.kv_cache
    assert cache.nbytes == core.cache_config.num_blocks * 16 * per_token


def test_engine_seed_makes_unseeded_sampling_reproducible(tiny_model_dir):
    sp = SamplingParams(temperature=1.0, max_tokens=8)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8]}] * 3
    runs = [[o.outputs[0].token_ids for o in LLM(str(tiny_model_dir), seed=s, kv_cache_memory=16 << 20).generate(prompts, sp, use_tqdm=False)]
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_cuda_only_argument_is_rejected_on_cpu():
    with pytest.raises(ValueError, match="CUDA only"):
        LLM(device="cpu", gpu_memory_utilization=0.5)


def test_a_failing_step_is_retried_per_request_and_leaves_nothing_behind(tiny_model_dir, monkeypatch):
    llm = LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory=16 << 20)
    sched = llm.engine.core.scheduler
    start = sched.kv.num_free_blocks
    prompts = [{"prompt_token_ids": [5, 6, 7, i]} for i in range(4)]
    sp = SamplingParams(max_tokens=8, temperature=0)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    runner = llm.engine.core.executor.worker.runner
    calls = {"n": 0}
    real = runner.execute_model

    def flaky(so):  # one transient failure, mid-generation
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return real(so)

    monkeypatch.setattr(runner, "execute_model", flaky)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected and not any(o.error for o in outs)
    assert llm.engine.core.num_failed_steps == 1
    assert not sched.has_unfinished_requests() and sched.kv.num_free_blocks == start
    assert not llm.engine.output_processor.parents

    # a request that always fails ends alone with an error, and its unwritten K/V is never hittable
    long_prompt = {"prompt_token_ids": list(range(100, 140))}

    def poisoned(so):
        if any(r.prompt_token_ids == long_prompt["prompt_token_ids"] for r in so.scheduled_new_reqs):
            raise RuntimeError("injected fault")
        return real(so)

    monkeypatch.setattr(runner, "execute_model", poisoned)
    out = llm.generate([long_prompt, prompts[0]], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    assert "injected fault" in out[0].error and out[0].outputs[0].finish_reason == "error"
    assert out[1].error is None and out[1].outputs[0].token_ids == expected[0][:2]
    assert sched.kv.num_free_blocks == start
    monkeypatch.setattr(runner, "execute_model", real)
    assert llm.generate(long_prompt, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0].num_cached_tokens == 0
