"""``fleetlm profile --quick`` on the real engine, and the simulator fed with what it measured."""

import re

import pytest

from fleetlm.entrypoints.cli import main
from fleetlm.sim import load_profile
from fleetlm.sim.step_model import StepShape

pytestmark = pytest.mark.slow


def test_profile_the_real_engine_then_simulate(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["profile", "--quick", "--out", str(out), "--kv-cache-memory", "256MiB"]) == 0
    prof = load_profile(out)
    assert prof.source == "measured" and prof.model == "smollm2-135m-instruct"
    assert prof.engine.num_blocks == 256 * 2**20 // (16 * prof.kv_bytes_per_token)  # the engine's own sizing
    assert prof.fit["samples"] >= 15 and len(prof.samples) == prof.fit["samples"]
    assert prof.fit["median_rel_err"] < 0.5
    one = prof.step_time(StepShape(1, 1, 100, 0, 100, 1))
    big = prof.step_time(StepShape(1024, 1, 0, 1024 * 1025 // 2, 2048, 1))
    assert 0 < one < big  # a 1024-token prefill costs more than one decode
    capsys.readouterr()
    assert main(["sim", "--profile", str(out), "--model", "smollm2-135m-instruct", "--num-prompts", "16",
                 "--request-rate", "2", "--random-input-len", "256", "--random-output-len", "16"]) == 0
    assert re.search(r"Successful requests:\s+16\n", capsys.readouterr().out)
    assert main(["sim", "--profile", str(out), "--model", "llama-3.1-8b", "--num-prompts", "4"]) == 2
    assert "not 'llama-3.1-8b'" in capsys.readouterr().err
