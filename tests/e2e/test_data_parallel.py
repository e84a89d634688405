"""Internal data parallelism: N engine cores behind one front end (tiny random model)."""

from __future__ import annotations

import subprocess
import sys
import uuid

import httpx
import pytest

from fleetlm.sampling_params import SamplingParams
from tests.e2e.test_router import SERVE, TIMEOUT, complete, metric_of, model_dir  # noqa: F401
from tests.server_utils import ServerProcess

KW = dict(dtype="float32", kv_cache_memory=32 << 20, num_threads=1)


def test_offline_dp_equals_one_core_and_uses_both(model_dir):  # noqa: F811
    from fleetlm import LLM

    prompts = [f"prompt number {i} says" for i in range(8)]
    sp = SamplingParams(max_tokens=8, temperature=0)
    with LLM(str(model_dir), **KW) as one:
        want = [o.outputs[0].text for o in one.generate(prompts, sp, use_tqdm=False)]
    with LLM(str(model_dir), data_parallel_size=2, data_parallel_policy="round_robin", **KW) as dp:
        got = [o.outputs[0].text for o in dp.generate(prompts, sp, use_tqdm=False)]
        per_core = dp.engine.client.balancer.stats
        assert [s.num_adds_seen for s in per_core] == [4, 4]  # round robin: half each
        assert all(s.kv_cache_usage == 0.0 and s.num_free_blocks == s.num_blocks for s in per_core)
        assert not dp.engine.client.balancer.owner  # every request left its core
    assert got == want


def test_bad_dp_arguments_are_errors(model_dir):  # noqa: F811
    from fleetlm.config import EngineArgs

    with pytest.raises(ValueError, match="data_parallel_size must be an integer >= 1"):
        EngineArgs(data_parallel_size=0)
    with pytest.raises(ValueError, match="session"):
        EngineArgs(data_parallel_policy="session")
    r = subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", "serve", str(model_dir),
                        "--data-parallel-policy", "fastest"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "data_parallel_policy" in r.stderr


def test_server_dp_outputs_prefix_hits_and_two_core_processes(model_dir):  # noqa: F811
    with ServerProcess([*SERVE], model=model_dir) as one:
        prompts = ["The capital of France is", "Once upon a time"]
        want = [complete(one.url, p, 10) for p in prompts]
    with ServerProcess([*SERVE, "--data-parallel-size", "2", "--data-parallel-policy", "prefix"],
                       model=model_dir) as srv:
        assert [complete(srv.url, p, 10) for p in prompts] == want
        assert [complete(srv.url, p, 10, stream=True) for p in prompts] == want
        children = subprocess.run(["pgrep", "-P", str(srv.proc.pid), "-f", "fleetlm.engine.core_proc"],
                                  capture_output=True, text=True).stdout.split()
        assert len(children) == 2
        tag = uuid.uuid4().hex
        groups = [f"{tag} group {g}: " + " ".join(f"w{g}x{i}" for i in range(60)) for g in range(4)]
        shared = len(httpx.post(srv.url + "/tokenize", json={"prompt": groups[0]}, timeout=30).json()["tokens"])
        before = metric_of(srv.url, "fleetlm:prefix_cache_hits_total")
        for q in range(3):
            for g in groups:
                complete(srv.url, g + f" question {q}?", 2)
        hits = metric_of(srv.url, "fleetlm:prefix_cache_hits_total") - before
        assert hits >= 0.9 * len(groups) * 2 * (shared // 16) * 16
        assert metric_of(srv.url, "fleetlm:kv_cache_usage_perc") == 0.0
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
        assert httpx.post(srv.url + "/v1/completions", json=body, timeout=TIMEOUT).status_code == 200
