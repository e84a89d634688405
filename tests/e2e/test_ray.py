"""Ray placement: a local Ray head on 127.0.0.1, ``fleetlm cluster up --replicas 2`` (tiny model)
behind the router; killing a replica actor leads to its restart and its return to rotation."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from tests.e2e.test_router import TIMEOUT, model_dir  # noqa: F401
from tests.server_utils import free_port

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter


def _workers(url: str) -> list[dict]:
    try:
        return httpx.get(url + "/health", timeout=10).json()["workers"]
    except (httpx.HTTPError, ValueError):
        return []


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (v := cond()):
            return v
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.fixture
def ray_head():
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="fleetlm-ray-")
    subprocess.run([*RAY_CLI, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", "4", "--include-dashboard", "false", "--disable-usage-stats",
                    "--min-worker-port", "30000", "--max-worker-port", "30999", "--temp-dir", tmp],
                   check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([*RAY_CLI, "stop", "--force"], capture_output=True, timeout=120)


def test_cluster_up_restarts_a_killed_replica_into_rotation(ray_head, model_dir):  # noqa: F811
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = f"{model_dir} --dtype float32 --kv-cache-memory 32MiB --num-threads 1 --served-model-name tiny"
    log = tempfile.NamedTemporaryFile(prefix="fleetlm-cluster-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "fleetlm.entrypoints.cli", "cluster", "up", "--replicas", "2",
                             "--address", ray_head, "--port", str(port), "--health-interval", "0.5",
                             "--serve-args", serve], stdout=log, stderr=subprocess.STDOUT)
    try:
        def two_up():
            ws = _workers(url)
            return ws if len(ws) == 2 and all(w["healthy"] for w in ws) else None

        before = _wait(two_up, 240, "two healthy replicas")
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        assert httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT).status_code == 200
        ray.init(address=ray_head, namespace="fleetlm", log_to_driver=False)
        try:
            actor = ray.get_actor("fleetlm-replica-0")
            old = ray.get(actor.url.remote())
            ray.kill(actor, no_restart=False)  # Ray restarts it: a fresh server on a new port

            def replaced():
                ws = two_up()
                return ws if ws and old not in {w["url"] for w in ws} else None

            after = _wait(replaced, 240, f"replica 0 ({old}) restarted and healthy")
            new = ray.get(ray.get_actor("fleetlm-replica-0").url.remote())
        finally:
            ray.shutdown()
        assert new in {w["url"] for w in after} and new != old
        assert {w["url"] for w in before} - {old} <= {w["url"] for w in after}  # the other one stayed
        for _ in range(4):  # both in rotation (round robin): every request succeeds
            assert httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT).status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_cluster_up_refuses_host_and_port_in_serve_args():
    r = subprocess.run([sys.executable, "-m", "fleetlm.entrypoints.cli", "cluster", "up", "--replicas", "1",
                        "--serve-args", "tiny --port 9000"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--port" in r.stderr


def test_ray_executor_places_tp_ranks_as_actors_and_matches_one_process(ray_head, model_dir, monkeypatch):  # noqa: F811
    from fleetlm import LLM
    from fleetlm.sampling_params import SamplingParams

    prompts = ["The capital of France is", "1, 2, 3,"]
    sp = SamplingParams(max_tokens=8, temperature=0)
    kw = dict(dtype="float32", kv_cache_memory=16 << 20)
    with LLM(str(model_dir), **kw) as one:
        want = [o.outputs[0].text for o in one.generate(prompts, sp, use_tqdm=False)]
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    try:
        with LLM(str(model_dir), tensor_parallel_size=2, distributed_executor_backend="ray", **kw) as llm:
            handles = llm.engine.core.executor.procs
            assert len(handles) == 1 and type(handles[0]).__name__ == "RayWorkerHandle"
            assert handles[0].poll() is None  # rank 1 lives in its actor
            got = [o.outputs[0].text for o in llm.generate(prompts, sp, use_tqdm=False)]
        assert handles[0].poll() is not None  # shut down with the engine
    finally:
        ray.shutdown()
    assert got == want
