"""Tensor and pipeline parallelism on gloo, tiny random models: every layout generates the same
greedy tokens as one process (with prefix caching, chunked prefill and preemption), blocks all
return to the pool, a dead worker makes the engine fail loudly and fast, torchrun runs the same
workers as two "nodes" on loopback, and bad layouts are refused naming the numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from fleetlm import LLM, SamplingParams
from fleetlm.executor.base import EngineDeadError
from tests.helpers import make_tiny_hf_dir
from tests.server_utils import free_port

PROMPTS = [[5, 17, 300, 42], list(range(100, 137)), [7] * 3, list(range(2000, 2090, 3)),
           list(range(100, 120)) + [1, 2, 3]]  # the last shares a prefix with the second
CONFIGS = {
    "default": {"kv_cache_memory": 16 << 20},
    "chunked-preempting": {"max_num_batched_tokens": 8, "num_kv_blocks": 20, "block_size": 4},
}
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}  # 3 layers: stages of 2 + 1
SP = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny_parallel"), initializer_range=0.2)


@pytest.fixture(scope="module")
def reference(tiny):
    out = {}
    for name, cfg in CONFIGS.items():
        with LLM(str(tiny), dtype="float32", **cfg) as llm:
            out[name] = [o.outputs[0].token_ids for o in _gen(llm, PROMPTS, SP)]
    return out


def _gen(llm, prompts, sp):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_is_token_identical_to_one_process(tiny, reference, layout, config):
    tp, pp = LAYOUTS[layout]
    with LLM(str(tiny), dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp,
             **CONFIGS[config]) as llm:
        assert [o.outputs[0].token_ids for o in _gen(llm, PROMPTS, SP)] == reference[config]
        sched = llm.engine.core.scheduler
        assert sched.kv.num_free_blocks == sched.cache_config.num_blocks  # every block is back
        hits = sched.kv.stats.hits  # with pp, the two sharers may be in different steps in flight
        assert [o.outputs[0].token_ids for o in _gen(llm, PROMPTS[4:], SP)] == reference[config][4:]
        assert sched.kv.stats.hits > hits  # a finished request's prefix is served from the cache
        if config == "chunked-preempting":
            assert sched.num_preemptions > 0
        if pp > 1:
            assert llm.engine.core.executor.max_concurrent_batches == pp


def test_given_layer_partition(tiny, reference):
    with LLM(str(tiny), dtype="float32", pipeline_parallel_size=2, pipeline_layer_partition=(1, 2),
             **CONFIGS["default"]) as llm:
        assert [o.outputs[0].token_ids for o in _gen(llm, PROMPTS, SP)] == reference["default"]
        assert llm.engine.core.executor.worker.runner.layer_ids == range(0, 1)


def test_logprobs_agree_across_tp_and_pp(tiny):
    sp = SamplingParams(max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=2)
    with LLM(str(tiny), dtype="float32", kv_cache_memory=16 << 20) as one:
        ref = _gen(one, PROMPTS[:2], sp)
    with LLM(str(tiny), dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2,
             pipeline_parallel_size=2) as four:
        got = _gen(four, PROMPTS[:2], sp)
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb in zip(a.outputs[0].logprobs + a.prompt_logprobs[1:], b.outputs[0].logprobs + b.prompt_logprobs[1:]):
            assert pa.keys() == pb.keys()
            for t in pa:
                assert abs(pa[t].logprob - pb[t].logprob) < 1e-4 and pa[t].rank == pb[t].rank


def test_killed_worker_fails_the_engine_within_seconds(tiny):
    llm = LLM(str(tiny), dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2)
    errors: list[BaseException] = []
    done = threading.Event()

    def run():
        try:
            _gen(llm, [PROMPTS[1]] * 4, SamplingParams(max_tokens=900, temperature=0, ignore_eos=True))
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(1.0)
    worker = llm.engine.core.executor.procs[0]
    worker.kill()
    killed_at = time.monotonic()
    assert done.wait(10), "the engine did not notice the dead worker within 10 s"
    assert time.monotonic() - killed_at < 10
    assert errors and isinstance(errors[0], EngineDeadError), errors
    with pytest.raises(EngineDeadError):
        _gen(llm, [PROMPTS[0]], SP)
    assert llm.engine.core.scheduler.kv.num_free_blocks == llm.engine.core.scheduler.cache_config.num_blocks
    llm.shutdown()


def test_torchrun_two_nodes_on_loopback_generate_like_one_process(tiny, tmp_path):
    args = ["generate", "--model", str(tiny), "--dtype", "float32", "--temperature", "0", "--max-tokens", "8",
            "--kv-cache-memory", "16MiB", "--tensor-parallel-size", "2", "The capital of France is"]
    single = subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", *args[:-3], args[-1]],
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "fleetlm.entrypoints.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        for i in (0, 1)]
    outs = [n.communicate(timeout=120) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "parallel: tensor 2 x pipeline 1" in outs[0][1]
    assert outs[0][0] == single.stdout and single.stdout.strip()
    assert outs[1][0] == ""  # rank 1 is a worker: it prints nothing


@pytest.mark.parametrize("kw,match", [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be an integer >= 1, got 0"),
    ({"pipeline_parallel_size": -1}, "pipeline_parallel_size must be an integer >= 1, got -1"),
    ({"tensor_parallel_size": 3}, "tensor_parallel_size 3 does not divide the model's 4 attention heads"),
    ({"pipeline_parallel_size": 4}, "pipeline_parallel_size 4 exceeds the model's 3 layers"),
    ({"tensor_parallel_size": 2, "distributed_executor_backend": "uniproc"}, "use 'multiproc'"),
    ({"pipeline_parallel_size": 2, "pipeline_layer_partition": (1, 1)},
     r"pipeline_layer_partition \[1, 1\] sums to 2, but the model has 3 layers"),
    ({"pipeline_parallel_size": 2, "pipeline_layer_partition": (3,)}, "must give pipeline_parallel_size"),
    ({"distributed_executor_backend": "multiproc"}, "'multiproc' needs tensor_parallel_size x pipeline"),
    ({"pipeline_parallel_size": 2, "pipeline_layer_partition": 5}, "must be a list of layer counts"),
    ({"distributed_executor_backend": "mpi"}, "distributed_executor_backend must be auto, uniproc, multiproc or ray"),
    ({"distributed_executor_backend": "ray"}, "'ray' needs tensor_parallel_size x pipeline"),
])
def test_bad_layouts_are_refused_naming_the_numbers(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(tiny), dtype="float32", kv_cache_memory=16 << 20, **kw)


def test_a_refused_parallel_start_leaves_nothing_behind(tiny):
    """A KV budget too small is the same ValueError at TP=2 as at TP=1; its workers are gone and
    the next parallel engine in this process starts normally."""
    with pytest.raises(ValueError, match="kv_cache_memory|KV"):
        LLM(str(tiny), dtype="float32", kv_cache_memory=100, tensor_parallel_size=2)
    import torch.distributed as dist

    assert not dist.is_initialized()
    with LLM(str(tiny), dtype="float32", kv_cache_memory=16 << 20, tensor_parallel_size=2) as llm:
        assert _gen(llm, PROMPTS[:1], SP)[0].outputs[0].token_ids


def test_cli_bad_layout_exits_2(tiny):
    r = subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", "generate", "--model", str(tiny),
                        "--tensor-parallel-size", "3", "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "tensor_parallel_size 3 does not divide the model's 4 attention heads" in r.stderr


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return out


def test_server_answers_503_when_a_worker_dies(tiny):
    import httpx

    from tests.server_utils import ServerProcess

    with ServerProcess(["--dtype", "float32", "--kv-cache-memory", "16MiB", "--tensor-parallel-size", "2"],
                       model=tiny) as srv:
        body = {"model": str(tiny), "prompt": "hello", "max_tokens": 8, "temperature": 0}
        assert httpx.post(srv.url + "/v1/completions", json=body, timeout=60).status_code == 200
        (core,) = _children(srv.proc.pid)
        (worker,) = _children(core)
        os.kill(worker, 9)
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 10:
            if httpx.get(srv.url + "/health", timeout=5).status_code == 503:
                break
            time.sleep(0.2)
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 503
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=10)
        assert r.status_code == 503 and "worker rank 1" in r.json()["error"]["message"]
        srv.proc.terminate()
        assert srv.proc.wait(15) == 0  # the front end exits cleanly
        assert not [p for p in (core, worker) if os.path.exists(f"/proc/{p}") and _is_running(p)]


def _is_running(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
