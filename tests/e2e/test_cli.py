"""The command line as a user runs it (subprocesses, real model)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def fleetlm(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_greedy():
    r = fleetlm("generate", "The capital of France is", "--max-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "KV cache:" in r.stderr and "blocks" in r.stderr  # start-up report


def test_chat_reads_turns_from_stdin():
    # fp32: the bf16 answer depends on the CPU's bf16 kernels (AMX machines answer differently)
    r = fleetlm("chat", "--temperature", "0", "--max-tokens", "16", "--dtype", "float32",
                stdin="What is the capital of France?\n/reset\nSay hello.\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_bad_input_exits_2_with_one_clear_line():
    r = fleetlm("generate", "hi", "--model", "no-such-model")
    assert r.returncode == 2 and "known aliases: smollm2-135m-instruct" in r.stderr
    assert "Traceback" not in r.stderr
    r = fleetlm("generate", "hi", "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr


def test_bench_throughput_small_run(tmp_path):
    out = tmp_path / "r.json"
    r = fleetlm("bench", "throughput", "--engines", "fleetlm", "--num-prompts", "2", "--save-result", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert rows[0]["engine"] == "fleetlm" and rows[0]["num_output_tokens"] == 2 * 128
    assert "out tok/s" in r.stdout


def test_plan_json():
    r = fleetlm("plan", "--model", "smollm2-135m-instruct", "--hardware", "cpu", "--mem-bandwidth", "40e9",
                "--peak-flops", "4e11", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2 and "roofline" in data
