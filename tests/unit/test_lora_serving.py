"""Serving LoRA adapters: PEFT's greedy tokens with the same adapter, a batch mixing two
adapters and none equal to each run alone, no prefix-cache hit across adapters, unloading after
the requests using an adapter finish, and clear errors for adapters that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_hf_dir

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["hello world the", "one two three four five six seven", "abc"]


def _peft_adapter(base: Path, out: Path, targets: list[str], seed: int, **cfg) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                     **cfg)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_serving")
    base = make_tiny_hf_dir(tmp / "base", initializer_range=0.2)
    return {"base": base, "qv": _peft_adapter(base, tmp / "qv", ["q_proj", "v_proj"], 1),
            "all": _peft_adapter(base, tmp / "all", ALL, 2),
            "rs": _peft_adapter(base, tmp / "rs", ["o_proj", "down_proj"], 3, use_rslora=True),
            "other": _peft_adapter(make_tiny_hf_dir(tmp / "other", hidden_size=32), tmp / "oth", ["q_proj"], 4)}


@pytest.fixture(scope="module")
def llm(dirs):
    from fleetlm import LLM

    with LLM(str(dirs["base"]), dtype="float32", enable_lora=True, num_kv_blocks=128, max_loras=4) as llm:
        yield llm


def _greedy(llm, prompts, lora, n=10):
    from fleetlm import SamplingParams

    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, lora_request=lora, use_tqdm=False)]


def _req(name, path, i=1):
    from fleetlm.lora import LoRARequest

    return LoRARequest(name, i, str(path))


@pytest.mark.parametrize("which", ["all", "rs"])
def test_greedy_tokens_equal_peft(llm, dirs, which):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32),
                                   dirs[which]).eval()
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = _greedy(llm, [{"prompt_token_ids": ids}], _req(which, dirs[which]))[0]
    assert ours == ref[0, len(ids):].tolist()
    assert ours != _greedy(llm, [{"prompt_token_ids": ids}], None)[0]  # the adapter changes the answer


def test_prompt_logprobs_equal_peft(llm, dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fleetlm import SamplingParams

    ids = list(range(200, 237))
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32),
                                   dirs["all"]).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                       lora_request=_req("all", dirs["all"]), use_tqdm=False)[0]
    ours = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
    torch.testing.assert_close(ours, ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], rtol=1e-4, atol=1e-4)


def test_mixed_batch_equals_each_alone(llm, dirs):
    loras = [_req("qv", dirs["qv"]), _req("all", dirs["all"]), None]
    alone = [_greedy(llm, [p], lr)[0] for p, lr in zip(PROMPTS, loras)]
    assert _greedy(llm, PROMPTS, loras) == alone
    assert _greedy(llm, PROMPTS[::-1], loras[::-1]) == alone[::-1]  # any order in the batch


def test_no_prefix_hit_across_adapters(llm, dirs):
    from fleetlm import SamplingParams

    sp = SamplingParams(max_tokens=2, temperature=0)
    prompt = {"prompt_token_ids": list(range(100, 164))}  # 4 full blocks
    first = llm.generate(prompt, sp, lora_request=_req("qv", dirs["qv"]), use_tqdm=False)[0]
    other = llm.generate(prompt, sp, lora_request=_req("all", dirs["all"]), use_tqdm=False)[0]
    again = llm.generate(prompt, sp, lora_request=_req("qv", dirs["qv"]), use_tqdm=False)[0]
    base = llm.generate(prompt, sp, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0 and base.num_cached_tokens == 0
    assert again.num_cached_tokens == 48


def test_unload_waits_for_requests_then_refuses_new_ones(llm, dirs):
    from fleetlm import SamplingParams

    eng = llm.engine
    eng.add_lora("tmp", str(dirs["qv"]))
    eng.add_request("u1", None, [5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                    lora_name="tmp")
    eng.step()
    eng.remove_lora("tmp")  # in use: unloaded when u1 ends
    with pytest.raises(ValueError, match="no LoRA adapter named 'tmp'"):
        eng.add_request("u2", None, [5, 6], SamplingParams(max_tokens=2), lora_name="tmp")
    assert "tmp" in eng.core.loras
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert len(outs[-1].outputs[0].token_ids) == 6 and outs[-1].error is None
    eng.step()
    assert "tmp" not in eng.core.loras
    assert all("tmp" not in m.lora_slots.adapters for m in eng.core.executor.worker.runner.model.modules()
               if hasattr(m, "lora_slots"))


def test_bad_adapters_are_refused_by_name(llm, dirs, tmp_path):
    eng = llm.engine
    with pytest.raises(ValueError, match="another base model"):
        eng.add_lora("other", str(dirs["other"]))
    with pytest.raises(ValueError, match="not a directory"):
        eng.add_lora("missing", str(tmp_path / "nope"))
    dora = tmp_path / "dora"
    dora.mkdir()
    cfg = json.loads((dirs["qv"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        eng.add_lora("dora", str(dora))
    with pytest.raises(ValueError, match="already loaded from"):
        eng.add_lora("qv", str(dirs["all"]))
    with pytest.raises(ValueError, match="invalid LoRA adapter name"):
        eng.add_lora("bad name", str(dirs["qv"]))
    from fleetlm import SamplingParams

    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        eng.add_request("x", None, [1, 2], SamplingParams(max_tokens=1), lora_name="nope")
    assert eng.core.scheduler.kv.num_free_blocks == eng.core.cache_config.num_blocks


def test_engine_arguments_are_checked(dirs):
    from fleetlm.config import EngineArgs
    from fleetlm.lora import parse_lora_modules

    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        EngineArgs(model=str(dirs["base"]), enable_lora=True, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="max_loras"):
        EngineArgs(model=str(dirs["base"]), lora_modules=(("a", "x"), ("b", "y")), max_loras=1)
    with pytest.raises(ValueError, match="speculative"):
        EngineArgs(model=str(dirs["base"]), enable_lora=True, speculative_config={"method": "ngram",
                                                                                  "num_speculative_tokens": 2})
    assert EngineArgs(model=str(dirs["base"]), lora_modules={"a": "x"}).enable_lora
    assert parse_lora_modules(["a=/p", '{"name": "b", "path": "/q"}']) == (("a", "/p"), ("b", "/q"))
    for bad, why in [(["a"], "name=path"), (["a=/p", "a=/q"], "twice"), (['{"name": "b"}'], "path")]:
        with pytest.raises(ValueError, match=why):
            parse_lora_modules(bad)


def test_lora_disabled_engine_refuses_adapters(dirs):
    from fleetlm import LLM

    with LLM(str(dirs["base"]), dtype="float32", num_kv_blocks=32) as llm, \
            pytest.raises(ValueError, match="enable_lora"):
        _greedy(llm, ["hi"], _req("qv", dirs["qv"]))
