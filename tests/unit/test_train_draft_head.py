"""``fleetlm train draft-head`` on a tiny random Llama (fp32): training lowers the head's loss, the
saved head loads into its proposer with no conversion and leaves greedy output unchanged, and a
head trained for another target (or bad input) is refused before any step."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fleetlm import LLM, SamplingParams
from fleetlm.entrypoints.cli import main as cli_main
from fleetlm.train import draft_head_data as data
from fleetlm.train.draft_head import DraftHeadConfig, DraftHeadTrainer, train_draft_head

ENGINE = dict(dtype="float32", kv_cache_memory=32 << 20, max_model_len=512)
PROMPTS = ["Explain the moon in simple terms.", "Write a haiku about cats.", "Why is sleep important?",
           "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return", "one two three one two three one"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with sharper next-token distributions than the shared fixture's
    (weights drawn with std 0.2), so that a head has something to learn in a few steps."""
    from tests.helpers import make_tiny_hf_dir

    return make_tiny_hf_dir(tmp_path_factory.mktemp("sharp_llama"), initializer_range=0.2)


def _cfg(method: str, tiny_model_dir, out, **kw) -> DraftHeadConfig:
    base = dict(method=method, target=str(tiny_model_dir), out=str(out), data=("chat",), num_prompts=12,
                max_new_tokens=24, dtype="float32", steps=3, batch_size=4, lr=3e-3, warmup_steps=1,
                eval_fraction=0.0, max_num_seqs=12)
    return DraftHeadConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tiny_model_dir):
    """The tiny target's own greedy answers and features (shared by the tests)."""
    prompts = data.load_prompts(("chat",), 8, 0)
    samples = data.generate_samples(str(tiny_model_dir), prompts, max_new_tokens=24, temperature=0.0, seed=0,
                                    dtype="float32", max_num_seqs=8)
    target = data.load_target(str(tiny_model_dir), torch.float32)
    return target, samples, target.features(samples)


@pytest.mark.parametrize("method", ["eagle", "medusa"])
def test_steps_reduce_the_heads_loss(method, tiny_model_dir, tmp_path, corpus):
    target, samples, feats = corpus
    lr = {"eagle": 3e-3, "medusa": 3e-2}[method]
    tr = DraftHeadTrainer(_cfg(method, tiny_model_dir, tmp_path, steps=6, lr=lr), target, samples, feats)
    seen = list(range(4))
    before = tr.evaluate(seen)
    for _ in range(6):
        tr.step()
    after = tr.evaluate(seen)
    assert after["loss"] < 0.85 * before["loss"], (before, after)
    kl = [k for k in after if k.startswith("kl")]  # the distillation term itself falls, for every Medusa head
    assert all(after[k] < before[k] for k in kl), (before, after)


def test_features_are_the_targets_final_normed_hidden_states(tiny_model_dir, corpus):
    """What a head trains on must be what the proposer sees: the hidden state the LM head reads."""
    target, samples, feats = corpus
    s = samples[0]
    assert feats[0].shape == (len(s.tokens), target.config.hidden_size)
    logits = target.logits(feats[0])
    # the answer is the target's greedy continuation: each answer token is the argmax at the position before it
    assert logits[s.prompt_len - 1 : -1].argmax(-1).tolist() == list(s.tokens[s.prompt_len :])


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """Both heads through the whole pipeline (the second run reuses the first one's corpus cache)."""
    d = tmp_path_factory.mktemp("draft_heads")
    return {m: train_draft_head(_cfg(m, tiny_model_dir, d / m, corpus_cache=str(d / "corpus.pt")),
                                progress=False).out for m in ("eagle", "medusa")}


@pytest.fixture(scope="module")
def greedy_reference(tiny_model_dir):
    ref = LLM(str(tiny_model_dir), **ENGINE)
    return [o.outputs[0].token_ids for o in ref.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24),
                                                         use_tqdm=False)]


@pytest.mark.parametrize("method", ["eagle", "medusa"])
def test_saved_head_loads_and_greedy_output_is_unchanged(method, tiny_model_dir, trained, greedy_reference):
    sp = SamplingParams(temperature=0, max_tokens=24)
    want = greedy_reference
    spec = {"method": method, "model": str(trained[method]), "num_speculative_tokens": 3, "adaptive": False}
    llm = LLM(str(tiny_model_dir), speculative_config=spec, **ENGINE)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    assert got == want
    assert llm.engine.core.scheduler.spec.stats.num_draft_tokens > 0  # the head did propose
    cfg = json.loads((trained[method] / "config.json").read_text())
    assert cfg["target"] == str(tiny_model_dir) and cfg["training"]["config"]["method"] == method


@pytest.mark.parametrize("method", ["eagle", "medusa"])
def test_head_for_another_target_is_refused(method, tiny_model_dir, trained, tmp_path_factory):
    from tests.helpers import make_tiny_hf_dir

    other = make_tiny_hf_dir(tmp_path_factory.mktemp("other_llama"), seed=1, initializer_range=0.2)  # same shapes, other weights
    spec = {"method": method, "model": str(trained[method]), "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match=f"trained for target '{tiny_model_dir}'"):
        LLM(str(other), speculative_config=spec, **ENGINE)
    with pytest.raises(ValueError, match="trained for target"):  # continuing it on the other target
        train_draft_head(_cfg(method, other, tmp_path_factory.mktemp("x"), init_from=str(trained[method])),
                         progress=False)


def test_bad_input_is_refused_before_any_step(tiny_model_dir, tmp_path, capsys):
    good = _cfg("eagle", tiny_model_dir, tmp_path)
    for bad, msg in [(replace(good, method="hydra"), "unknown method 'hydra'"),
                     (replace(good, data=("nope.txt",)), "'nope.txt': not one of"),
                     (replace(good, steps=0), "steps must be >= 1"),
                     (replace(good, num_heads=4), "Medusa settings")]:
        with pytest.raises(ValueError, match=msg):
            train_draft_head(bad, progress=False)
    assert not (tmp_path / "config.json").exists()
    rc = cli_main(["train", "draft-head", "--method", "medusa", "--target", str(tiny_model_dir),
                   "--out", str(tmp_path / "m"), "--data", str(tmp_path / "missing.jsonl")])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: unknown method
        cli_main(["train", "draft-head", "--method", "hydra", "--out", str(tmp_path)])
    assert e.value.code == 2
