"""Context parallelism (train/context_parallel.py) equals one process over 5 steps of a tiny
random Llama in float32: CP=2 on 2 gloo ranks and FSDP x CP (dp_shard=2 x cp=2) on 4.

Tolerance: the same as the other layouts (tests/unit/test_train_parallel.py): rtol 2e-5 /
atol 2e-6 on losses, rtol 1e-4 on gradient norms, atol 5e-5 on parameters. Not 0 because
the float32 additions happen in another order: each chunk's attention is a masked SDPA over
a prefix of the keys (one causal SDPA over the whole sequence in one process), the loss is the
mean of per-rank means, and the gradient is summed over ranks (the all-gather's backward for
K/V, the data-parallel all-reduce for the parameters).

Every process reads the tokenizer from a ``tokenizer.json`` directory (``tok_dir``) rather than
parsing SmolLM2's GGUF (about 3 s of CPU per rank saved; the same vocabulary and ids).

Each run also writes a DCP checkpoint at its end, which one process resumes: the parameters it
loads are the reference's (CP changes no parameter names; FSDP x CP shards load unsharded).
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_train_parallel import BASE, assert_same, run_ranks, train_once

CP = ["data.seq_len=32", "parallelism.cp=2"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    """SmolLM2's tokenizer as a Hugging Face directory (weights unused: ``model.size`` builds)."""
    import json

    from safetensors.torch import save_file

    from fleetlm.models.hub import DEFAULT_MODEL
    from fleetlm.train.model import PRESETS, _tokenizer

    tok, out = _tokenizer(DEFAULT_MODEL), tmp_path_factory.mktemp("cp_tokenizer")
    tok.backend.save(str(out / "tokenizer.json"))
    (out / "config.json").write_text(json.dumps(dict(
        PRESETS["tiny"], architectures=["LlamaForCausalLM"], vocab_size=tok.vocab_size,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)))
    save_file({"unused": torch.zeros(1)}, str(out / "model.safetensors"))
    return f'model.tokenizer="{out}"'


@pytest.fixture(scope="module")
def reference(tok_dir):
    return train_once(["training.micro_batch=4", tok_dir])


def test_cp2_equals_one_process(reference, tok_dir, tmp_path):
    """Each rank holds chunks (i, 3 - i) of 4 per sequence; RoPE at global positions, keys
    and values gathered; gradients averaged over the CP ranks."""
    got = run_ranks(2, ["training.micro_batch=4", tok_dir, checkpoint_dir(tmp_path)] + CP, tmp_path)
    assert_same(reference, got)
    assert_resumes_at_one_process(reference, tok_dir, tmp_path)


def test_fsdp_x_cp_on_four_ranks_equals_one_process(reference, tok_dir, tmp_path):
    """2-D mesh (dp_shard=2, cp=2): two sequences per data-parallel rank, each split over 2
    CP ranks; FSDP2 shards over the flattened dp_shard x cp mesh; every other layer is
    recomputed in backward (its K/V all-gather with it)."""
    got = run_ranks(4, ["training.micro_batch=2", "parallelism.dp_shard=2", tok_dir, checkpoint_dir(tmp_path),
                        'parallelism.activation_checkpointing="every:2"'] + CP, tmp_path)
    assert_same(reference, got)
    assert_resumes_at_one_process(reference, tok_dir, tmp_path)


def checkpoint_dir(tmp_path) -> str:
    return f'checkpoint.dir="{tmp_path / "ckpt"}"'


def assert_resumes_at_one_process(reference, tok_dir: str, tmp_path) -> None:
    from fleetlm.train.config import load_config
    from fleetlm.train.export import full_state_dict
    from fleetlm.train.trainer import Trainer

    tr = Trainer(load_config(None, BASE + ["training.micro_batch=4", tok_dir, checkpoint_dir(tmp_path),
                                           "checkpoint.resume=true"]))
    assert tr.step_index == 5
    params = full_state_dict(tr)
    for name, ref in reference[2].items():
        torch.testing.assert_close(params[name], ref, rtol=0, atol=5e-5, msg=name)


def test_shard_chunks_and_positions():
    from fleetlm.train.context_parallel import CPShard

    x = torch.arange(16)[None]
    parts = [CPShard(r, 2).split(x) for r in range(2)]
    assert parts[0].tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert parts[1].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert CPShard(1, 2).positions(16).tolist() == list(range(4, 12))
    assert torch.equal(CPShard(0, 2).natural_order(tuple(parts)), x)


@pytest.mark.parametrize("override,match", [
    (["data.seq_len=30"], r"parallelism.cp = 2 needs data.seq_len \(30\) divisible by 2 x cp = 4"),
    (["parallelism.tp=2"], "composes with dp_shard"),
    (["parallelism.dp_replicate=2"], "not dp_replicate"),
    (["lora.r=4"], "LoRA with parallelism.cp"),
])
def test_bad_cp_layout_is_refused_before_any_step(override, match):
    """Checked by the config itself: no process group, model or step needed."""
    from fleetlm.train.config import load_config

    with pytest.raises(ValueError, match=match):
        load_config(None, ['model.size="tiny"', "data.seq_len=32", "parallelism.cp=2"] + override)


def test_bad_cp_on_the_command_line_exits_2_naming_it():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", "train", "--set", 'model.size="tiny"',
                        "--set", "parallelism.cp=2", "--set", "data.seq_len=30"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "parallelism.cp = 2 needs data.seq_len (30) divisible by 2 x cp = 4" in r.stderr
