"""``fleetlm plan`` end to end through ``run()``: JSON keys, readable output, errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleetlm.plan.cli import add_arguments, run

FLAT_KEYS = ("params_total", "params_active", "weights_bytes", "kv_bytes_per_token",
             "kv_bytes_total", "max_concurrent_seqs", "tp", "pp", "ep", "dp")


def invoke(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="fleetlm plan")
    add_arguments(parser)
    code = run(parser.parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_flat_keys_and_roofline(capsys):
    code, out, _ = invoke(capsys, "--model", "llama-3.1-70b", "--hardware", "h100-sxm", "--gpus",
                          "8", "--dtype", "bf16", "--context", "8192", "--concurrency", "64", "--json")
    assert code == 0
    data = json.loads(out)
    assert all(k in data for k in FLAT_KEYS)
    assert data["kv_bytes_per_token"] == 327_680
    assert data["kv_bytes_total"] == 64 * 8192 * 327_680
    assert data["tp"] * data["pp"] * data["dp"] * data["cp"] == 8
    roof = data["roofline"]
    for key in ("ridge_intensity", "ttft_s", "tpot_s", "decode_tokens_per_s", "decode", "prefill"):
        assert key in roof
    assert roof["decode"]["bound"] == "memory" and roof["prefill"]["bound"] == "compute"


def test_config_json_on_cpu(capsys, tmp_path: Path):
    cfg = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
           "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30,
           "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    code, out, _ = invoke(capsys, "--model", str(path), "--hardware", "cpu", "--mem-bandwidth",
                          "40e9", "--peak-flops", "1e12", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["params_total"] == 134_515_008
    assert data["kv_bytes_per_token"] == 23_040
    assert data["roofline"]["peak_flops"] == 1e12


def test_readable_table_explains_arithmetic(capsys):
    code, out, _ = invoke(capsys, "--model", "mixtral-8x7b", "--gpus", "8", "--context", "4096",
                          "--concurrency", "32")
    assert code == 0
    assert "2 (K,V) × 32 layers × 8 KV heads × 128 × 2 B" in out
    assert "EP=" in out and "TTFT" in out and "ridge" in out


def test_training_mode(capsys):
    code, out, _ = invoke(capsys, "--model", "llama-3.1-70b", "--train", "--gpus", "256",
                          "--tokens", "2e12", "--mfu", "0.4", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["train_flops"] == 6 * 70_553_706_496 * 2e12
    assert data["wallclock_days"] == pytest.approx(96.7, abs=0.1)
    assert set(data["memory_per_gpu"]) == {"ddp", "zero1", "zero2", "zero3", "fsdp2"}
    assert all(k in data for k in ("params_total", "params_active", "tp", "pp", "ep", "dp"))


def test_plot_writes_png(capsys, tmp_path: Path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "roofline.png"
    code, _, err = invoke(capsys, "--model", "smollm2-135m", "--hardware", "cpu",
                          "--mem-bandwidth", "40e9", "--peak-flops", "4e11", "--plot", str(png))
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert "roofline written" in err


@pytest.mark.parametrize("argv,needle", [
    (["--model", "llama-9000"], "unknown model 'llama-9000'"),
    (["--model", "llama-3.1-8b", "--hardware", "tpu-v9"], "accepted values: a100-80g, h100-sxm"),
    (["--model", "llama-3.1-8b", "--hardware", "cpu"], "needs --mem-bandwidth, --peak-flops"),
    (["--model", "llama-3.1-8b", "--dtype", "int3"], "accepted values: fp32, fp16, bf16"),
    (["--model", "llama-3.1-8b", "--train", "--concurrency", "8"], "contradictory flags: --concurrency"),
    (["--model", "llama-3.1-8b", "--tokens", "1e12"], "contradictory flags: --tokens need --train"),
    (["--model", "llama-3.1-8b", "--gpus", "8", "--tp", "8", "--dp", "2"], "contradictory flags"),
    (["--model", "llama-3.1-8b", "--probe"], "use it with --hardware cpu"),
    (["--model", "llama-3.1-8b", "--context", "100", "--input-len", "90", "--output-len", "20"],
     "exceeds the context"),
    (["--model", "llama-3.1-8b", "--dtype", "native"], "needs a GGUF model"),
])
def test_bad_input_names_the_problem(capsys, argv, needle):
    code, out, err = invoke(capsys, *argv)
    assert code == 2 and out == ""
    assert needle in err


def test_config_missing_fields(capsys, tmp_path: Path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64, "vocab_size": 100}))
    code, _, err = invoke(capsys, "--model", str(path))
    assert code == 2
    assert "missing num_hidden_layers, num_attention_heads, intermediate_size" in err


def test_gguf_alias(capsys):
    from fleetlm.models.hub import resolve_model

    try:
        resolve_model("smollm2-135m-instruct")
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
    code, out, _ = invoke(capsys, "--model", "smollm2-135m-instruct", "--hardware", "cpu",
                          "--mem-bandwidth", "40e9", "--peak-flops", "4e11", "--dtype", "native",
                          "--json")
    data = json.loads(out)
    assert code == 0 and data["params_total"] == 134_515_008
    assert data["weights_bytes"] == 96_576_768  # the file's tensor bytes (Q4_1 + Q8_0 + F32)


def test_module_entry_point_and_cheap_import():
    code = ("import sys, fleetlm.plan as p; p.kv_cache_num_blocks(1 << 20, 16, 64); "
            "print(any(m.split('.')[0] in ('torch', 'rich', 'matplotlib', 'gguf') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    proc = subprocess.run([sys.executable, "-m", "fleetlm.plan", "--model", "smollm2-135m",
                           "--hardware", "cpu", "--mem-bandwidth", "4e10", "--peak-flops", "4e11",
                           "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tp"] == 1
