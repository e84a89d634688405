"""``fleetlm train`` under torchrun: 2 ranks of FSDP2 from one command line, and a mesh that
does not match the world size makes every rank exit with code 2 (torchrun then fails), naming
both numbers."""

from __future__ import annotations

import subprocess
import sys

from tests.unit.test_train_parallel import free_port

ARGS = ["--set", 'model.size="tiny"', "--set", "data.max_files=2", "--set", "data.seq_len=32",
        "--set", "training.steps=2", "--set", "training.micro_batch=2", "--set", "logging.progress=false"]


def _torchrun(*extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "fleetlm.entrypoints.cli", "train", *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_torchrun_fsdp2_trains():
    r = _torchrun("--set", "parallelism.dp_shard=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 2: loss" in r.stdout


def test_torchrun_with_a_mesh_of_another_size_fails_naming_it():
    r = _torchrun("--set", "parallelism.dp_shard=3")
    assert r.returncode != 0
    assert "dp_shard x tp x cp = 1 x 1 x 3 x 1 x 1 = 3 does not match the world size 2" in r.stderr
