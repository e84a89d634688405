"""``fleetlm train`` config, data, schedule and command line (single process)."""

from __future__ import annotations

import json

import pytest
import torch

from fleetlm.train.config import TrainConfig, apply_overrides, load_config

TOML = """
[model]
size = "tiny"
[data]
paths = ["stdlib"]
max_files = 2
seq_len = 16
[training]
steps = 3
micro_batch = 2
[optimizer]
lr = 1e-3
betas = [0.9, 0.99]
[logging]
progress = false
"""


def test_toml_and_yaml_give_the_same_config(tmp_path):
    import yaml

    (tmp_path / "a.toml").write_text(TOML)
    import tomllib

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(tomllib.loads(TOML)))
    a, b = load_config(tmp_path / "a.toml"), load_config(tmp_path / "a.yaml")
    assert a == b and a.optimizer.betas == (0.9, 0.99) and a.data.paths == ("stdlib",)


@pytest.mark.parametrize("overrides,match", [
    (["modle.size=1"], "unknown config section.*modle"),
    (['model.sise="tiny"'], r"unknown key\(s\) in \[model\]: sise"),
    (['model.size="tiny"', "training.steps=1.5"], "training.steps must be int"),
    (['model.size="tiny"', "optimizer.betas=[0.9]"], "optimizer.betas must have 2 items"),
    (['model.size="tiny"', 'parallelism.pp_schedule="zb"'], "accepted values: gpipe, 1f1b"),
    (['model.size="tiny"', 'parallelism.activation_checkpointing="some"'], "every:K"),
    (['model.size="tiny"', "parallelism.cp=3"], r"parallelism.cp = 3 needs data.seq_len \(128\) divisible"),
    (['model.size="tiny"', "checkpoint.every=2"], "need checkpoint.dir"),
    (['model.size="tiny"', 'lora.r=4', 'lora.target_modules=["qkv"]'], "target_modules qkv"),
    ([], "exactly one of model.path"),
    (["bad"], "section.key=value"),
])
def test_bad_config_is_an_error_naming_it(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_overrides_parse_toml_values_and_leave_the_input_alone():
    raw = {"model": {"size": "tiny"}}
    out = apply_overrides(raw, ["optimizer.lr=3e-4", "data.paths=['a', 'b']", "checkpoint.dir=/tmp/x"])
    assert out["optimizer"]["lr"] == 3e-4 and out["data"]["paths"] == ["a", "b"]
    assert out["checkpoint"]["dir"] == "/tmp/x" and "optimizer" not in raw
    assert TrainConfig.from_dict(out).optimizer.lr == 3e-4


def test_layout_errors_come_before_any_step():
    from fleetlm.train.parallel import check_model_fits

    cfg = load_config(None, ['model.size="tiny"', "parallelism.dp_shard=2"])
    with pytest.raises(ValueError, match="multiplies to 2 ranks but this is one process"):
        from fleetlm.train.trainer import Trainer

        Trainer(cfg)
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        check_model_fits(load_config(None, ['model.size="tiny"', "parallelism.tp=3"]).parallelism, 4, 2, 4, False)
    with pytest.raises(ValueError, match="pp 5 exceeds the model's 4 layers"):
        check_model_fits(load_config(None, ['model.size="tiny"', "parallelism.pp=5"]).parallelism, 4, 2, 4, False)


def test_schedule_warms_up_then_decays_to_the_floor():
    from fleetlm.train.config import ScheduleSection
    from fleetlm.train.optim import lr_factor

    s = ScheduleSection(warmup_steps=4, min_lr_ratio=0.1)
    f = [lr_factor(i, 20, s) for i in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert f[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[4:], f[5:]))


def test_data_is_sharded_by_rank_deterministic_and_a_function_of_the_step(tmp_path):
    from fleetlm.train.data import BatchPlan, PackedDataset

    tokens = torch.arange(1000)
    ds = PackedDataset(tokens, 9, seed=3)
    one, two = BatchPlan(4, 1, 1), BatchPlan(2, 1, 2)
    for step in (0, 5, 40):  # 40 * 4 windows > 110: into later epochs
        whole = ds.rows(one.first(step, 0, 0), 4).inputs
        halves = torch.cat([ds.rows(two.first(step, 0, r), 2).inputs for r in (0, 1)])
        assert torch.equal(whole, halves)
    b = ds.rows(7, 3)
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])  # targets are the next tokens
    assert torch.equal(PackedDataset(tokens, 9, seed=3).rows(7, 3).inputs, b.inputs)
    assert not torch.equal(PackedDataset(tokens, 9, seed=4).rows(7, 3).inputs, b.inputs)
    epoch0 = torch.stack([ds.window(i) for i in range(ds.windows)])
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 9 * ds.windows, 9))  # every window once


def test_jsonl_documents(tmp_path):
    from fleetlm.train.config import DataSection
    from fleetlm.train.data import tokenize_corpus
    from fleetlm.train.model import _tokenizer

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"text": "bye"}) + "\n")
    tok = _tokenizer("smollm2-135m-instruct")
    ids = tokenize_corpus(DataSection(paths=(str(f),), format="jsonl"), tok).tolist()
    eos = tok.eos_token_id
    assert ids == tok.encode("hello world", False) + [eos] + tok.encode("bye", False) + [eos]
    f.write_text('{"body": 1}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: not a JSON object with a 'text'"):
        tokenize_corpus(DataSection(paths=(str(f),), format="jsonl"), tok)


def test_cli_trains_logs_and_plots(tmp_path, capsys):
    from fleetlm.entrypoints.cli import main

    (tmp_path / "c.toml").write_text(TOML)
    log, png = tmp_path / "log.jsonl", tmp_path / "loss.png"
    rc = main(["train", "--config", str(tmp_path / "c.toml"), "--set", f'logging.jsonl="{log}"',
               "--set", "logging.peak_flops=1e11", "--plot", str(png)])
    assert rc == 0 and "step 3: loss" in capsys.readouterr().out
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["tokens"] == 32 and r["loss"] > 0 and r["grad_norm"] > 0 and 0 < r["mfu"] < 1
        assert r["peak_memory_bytes"] > 0 and r["tokens_per_s"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--set", "data.nope=1"]) == 2
    assert "unknown key(s) in [data]: nope" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,match", [
    (['model.path="x"', "model.seed=3"], "model.seed and model.tokenizer are for a model from scratch"),
    (['model.size="tiny"', "parallelism.pp_microbatches=4"], "need parallelism.pp > 1"),
    (['model.size="tiny"', "parallelism.reshard_after_forward=false"], "needs dp_shard > 1"),
    (['model.size="tiny"', 'precision.reduce_dtype="bfloat16"'], "needs parallelism.dp_shard > 1"),
])
def test_a_setting_its_layout_would_ignore_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)
