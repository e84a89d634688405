"""Speculative decoding on the real model (SmolLM2-135M, fp32): greedy output with each proposer
equals the output without speculation on 20 prompts; a draft model equal to the target has
acceptance 1.0; the server takes ``--speculative-config`` and refuses a bad one (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fleetlm import LLM, SamplingParams
from fleetlm.spec_decode.heads import random_eagle_head, random_medusa_heads

pytestmark = pytest.mark.slow

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bees", "trains", "glass", "tea", "maps"]
PROMPTS = ([f"Write two sentences about {t}." for t in TOPICS]
           + [f"Repeat exactly: 'The {t} report is due on Friday at noon.' Then repeat it again." for t in TOPICS])
ENGINE = dict(dtype="float32", kv_cache_memory=256 << 20)


@pytest.fixture(scope="module")
def reference(llm_fp32):
    sp = SamplingParams(temperature=0, max_tokens=24)
    return [o.outputs[0].token_ids for o in llm_fp32.generate(PROMPTS, sp, use_tqdm=False)]


def _config(method: str, llm_fp32, tmp_path) -> dict:
    cfg = llm_fp32.engine.model_config
    base = {"num_speculative_tokens": 3, "adaptive": False}
    return {
        "ngram": {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4, **base},
        "draft_model": {"method": "draft_model", "model": "smollm2-135m-instruct", **base},
        "self_spec": {"method": "self_spec", "num_draft_layers": 8, **base},
        "eagle": {"method": "eagle", "model": str(random_eagle_head(tmp_path / "e", cfg)), **base},
        "medusa": {"method": "medusa", "model": str(random_medusa_heads(tmp_path / "m", cfg)), **base},
    }[method]


@pytest.mark.parametrize("method", ["ngram", "draft_model", "self_spec", "eagle", "medusa"])
def test_greedy_equals_no_speculation(method, llm_fp32, reference, tmp_path):
    with LLM(speculative_config=_config(method, llm_fp32, tmp_path), **ENGINE) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24),
                                                              use_tqdm=False)]
        stats = llm.engine.core.scheduler.spec.stats
    assert got == reference
    assert stats.num_draft_tokens > 0
    if method == "draft_model":  # the draft is the target: every draft token is accepted
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    if method == "ngram":  # the repeat prompts give the lookup something to copy
        assert stats.num_accepted_tokens > 0


def test_cli_refuses_a_bad_speculative_config():
    for bad in ('{"method": "nope", "num_speculative_tokens": 2}', '{"method": "ngram", "num_speculative_tokens": 0}',
                '{"method": "ngram", "num_speculative_tokens": 2, "x": 1}', "[1]"):
        r = subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", "serve", "--speculative-config", bad,
                            "--port", "18501"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (bad, r.stderr[-500:])
        assert "speculative" in r.stderr


def test_server_speculates_and_reports_acceptance(tiny_model_dir):
    """``fleetlm serve --speculative-config``: greedy completions equal the offline engine's without
    speculation, ``/metrics`` counts drafts, ``fleetlm bench serve`` prints the acceptance figures."""
    import json

    import httpx

    from tests.server_utils import ServerProcess

    prompt = "one two three four one two three four one two three four one two"
    want = LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory=32 << 20).generate(
        prompt, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0].text
    cfg = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "adaptive": False, "prompt_lookup_min": 1})
    with ServerProcess(["--dtype", "float32", "--kv-cache-memory", "32MiB", "--speculative-config", cfg],
                       model=tiny_model_dir) as srv:
        r = httpx.post(srv.url + "/v1/completions", timeout=60,
                       json={"model": str(tiny_model_dir), "prompt": prompt, "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        assert srv.metric("fleetlm:spec_decode_num_draft_tokens_total") > 0
        assert srv.metric("fleetlm:spec_decode_num_drafts_total") > 0
        bench = subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", "bench", "serve", "--base-url", srv.url,
                                "--num-prompts", "4", "--random-input-len", "24", "--random-output-len", "16",
                                "--tokenizer", str(tiny_model_dir), "--num-warmups", "0", "--ignore-eos"],
                               capture_output=True, text=True, timeout=300)
        assert bench.returncode == 0, bench.stderr[-800:]
        assert "Speculative Decoding" in bench.stdout and "Acceptance length:" in bench.stdout
