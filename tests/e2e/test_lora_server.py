"""``fleetlm serve --lora-modules``: a request picks an adapter by ``model`` and gets PEFT's
greedy tokens; /v1/models lists the adapters; adapters load and unload at run time; unknown
names and bad adapters are 4xx errors naming them; blocks all return to the pool."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.helpers import make_tiny_hf_dir
from tests.server_utils import ServerProcess
from tests.unit.test_lora_serving import _peft_adapter

pytestmark = pytest.mark.slow
PROMPT = [7, 300, 4000, 12, 9, 250, 31, 8, 77, 1000]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_server")
    base = make_tiny_hf_dir(tmp / "base", initializer_range=0.2)
    qv = _peft_adapter(base, tmp / "qv", ["q_proj", "v_proj", "down_proj"], 1)
    other = _peft_adapter(make_tiny_hf_dir(tmp / "other", hidden_size=32), tmp / "other_ad", ["q_proj"], 2)
    args = ["--dtype", "float32", "--lora-modules", f"qv={qv}", "--allow-runtime-lora", "--kv-cache-memory", "8MiB"]
    with ServerProcess(args, model=base) as srv:
        srv.free_at_start = srv.metric("fleetlm:kv_cache_free_blocks")
        yield srv, base, qv, other


def _complete(srv, model, max_tokens=8):
    r = httpx.post(srv.url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                      "temperature": 0, "ignore_eos": True}, timeout=60)
    return r


def _peft_greedy(base, adapter, n=8):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def _tokens(srv, text):
    return httpx.post(srv.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30).json()["tokens"]


def test_models_lists_adapters_and_requests_pick_them(setup):
    srv, base, qv, _ = setup
    cards = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]
    assert [c["id"] for c in cards] == [str(base), "qv"] and cards[1]["parent"] == str(base)
    with_qv, plain = _complete(srv, "qv"), _complete(srv, str(base))
    assert with_qv.status_code == 200 and plain.status_code == 200
    ours = with_qv.json()["choices"][0]["text"]
    assert ours != plain.json()["choices"][0]["text"]
    assert _tokens(srv, ours) == _peft_greedy(base, qv)  # SmolLM2's tokenizer round-trips these ids' text


def test_unknown_model_is_404_naming_the_adapters(setup):
    srv, *_ = setup
    r = _complete(srv, "nope")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and "'qv'" in err["message"] and err["param"] == "model"


def test_load_and_unload_at_run_time(setup):
    srv, base, qv, other = setup
    bad = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "o", "lora_path": str(other)}, timeout=30)
    assert bad.status_code == 400 and "another base model" in bad.json()["error"]["message"]
    extra = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "o", "lora_path": str(other),
                                                                "x": 1}, timeout=30)
    assert extra.status_code == 400
    ok = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "qv2", "lora_path": str(qv)}, timeout=30)
    assert ok.status_code == 200
    assert "qv2" in [c["id"] for c in httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]]
    assert _complete(srv, "qv2").json()["choices"][0]["text"] == _complete(srv, "qv").json()["choices"][0]["text"]
    gone = httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "qv2"}, timeout=30)
    assert gone.status_code == 200
    assert _complete(srv, "qv2").status_code == 404
    again = httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "qv2"}, timeout=30)
    assert again.status_code == 404 and again.json()["error"]["code"] == "lora_not_found"
    assert srv.metric("fleetlm:kv_cache_free_blocks") == srv.free_at_start


def test_concurrent_loads_of_one_name_from_two_paths_admit_exactly_one(setup, tmp_path):
    """The check and the add are one step: two loads racing for one name cannot both pass."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    srv, _, qv, _ = setup
    twin = shutil.copytree(qv, tmp_path / "qv_twin")

    def load(path):
        return httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "race", "lora_path": str(path)},
                          timeout=60)

    with ThreadPoolExecutor(2) as pool:
        codes = sorted(r.status_code for r in pool.map(load, [qv, twin]))
    assert codes == [200, 400]
    assert httpx.post(srv.url + "/v1/unload_lora_adapter", json={"lora_name": "race"}, timeout=30).status_code == 200
