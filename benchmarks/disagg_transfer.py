"""Transfer bandwidth and latency of one request's K/V (default: 4,096 tokens of SmolLM2-135M in
bf16, 30 layers x 2 x 3 KV heads x 64) for every transport, next to this machine's memcpy.

The producer runs in its own process (``--serve``): it stages the bytes in its outbox, as the
engine does after a prefill, and serves them on the control channel. This process is the
consumer: each fetch is a full ``KVClient.fetch`` (control round trip + data), then a release.
``memcpy`` is ``torch`` copying the same bytes inside one process: the bound for ``shm``, which
copies once out of the shared segment.

``--plan`` adds the estimate ``fleetlm plan --disagg --hardware cpu --probe`` makes for the same
transfer (``fleetlm/plan/pd.py``: loopback TCP at the probed rate plus one copy for ``tcp`` and
``torch_distributed``, one copy at the probed read bandwidth / 2 for ``shm``), beside each
transport's measured median.

    flock /tmp/fleetlm-bench.lock python benchmarks/disagg_transfer.py --plan --out benchmarks/disagg_transfer.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from fleetlm.disagg.meta import EngineFingerprint, TransferMeta
from fleetlm.disagg.transports import TRANSPORTS, make_transport

FP = EngineFingerprint("LlamaForCausalLM", 30, 3, 64, "bfloat16", 16, "bench")


def nbytes_for(tokens: int) -> int:
    return tokens * FP.num_layers * 2 * FP.num_kv_heads * FP.head_dim * 2


def serve(transport: str, address: str, tokens: int, copies: int) -> None:
    from fleetlm.disagg.server import KVOutbox, KVServer

    t = make_transport(transport)
    outbox = KVOutbox(t, ttl_s=600, max_bytes=1 << 40)
    blocks = -(-tokens // FP.block_size)
    data = torch.randint(0, 255, (nbytes_for(blocks * FP.block_size),), dtype=torch.uint8)
    bpb = data.numel() // blocks
    for i in range(copies):
        meta = TransferMeta(f"t{i}", FP, list(range(tokens)), 0, [], blocks, bpb, time.time() + 600)
        outbox.put(meta, t.stage(data, bpb))
    server = KVServer(address, outbox, FP)
    print("ready", flush=True)
    sys.stdin.read()  # until the consumer closes our stdin
    server.close()
    t.close()


def bench(transport: str, tokens: int, repeats: int) -> dict:
    from fleetlm.disagg.client import KVClient
    from tests.server_utils import free_port

    addr = f"127.0.0.1:{free_port()}"
    prod = subprocess.Popen([sys.executable, __file__, "--serve", transport, addr, str(tokens), str(repeats + 1)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert prod.stdout.readline().strip() == "ready"
        t = make_transport(transport)
        client = KVClient(t, FP, (addr,), 120)
        secs = []
        for i in range(repeats + 1):  # the first one also joins groups / warms up
            t0 = time.perf_counter()
            _, data = client.fetch(addr, f"t{i}", 0)
            dt = time.perf_counter() - t0
            client.release(addr, f"t{i}")
            if i:
                secs.append(dt)
        n = data.numel()
        t.close()
    finally:
        prod.stdin.close()
        prod.wait(30)
    med = statistics.median(secs)
    return {"transport": transport, "bytes": n, "latency_ms_median": med * 1e3, "latency_ms_min": min(secs) * 1e3,
            "gb_per_s": n / med / 1e9}


def memcpy(tokens: int, repeats: int) -> dict:
    src = torch.randint(0, 255, (nbytes_for(-(-tokens // 16) * 16),), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        secs.append(time.perf_counter() - t0)
    med = statistics.median(secs)
    return {"transport": "memcpy (torch copy_, one process)", "bytes": src.numel(), "latency_ms_median": med * 1e3,
            "latency_ms_min": min(secs) * 1e3, "gb_per_s": src.numel() / med / 1e9}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out")
    ap.add_argument("--plan", action="store_true", help="add the planner's estimate per transport")
    args = ap.parse_args()
    rows = [memcpy(args.tokens, args.repeats)] + [bench(t, args.tokens, args.repeats) for t in TRANSPORTS]
    base = rows[0]["gb_per_s"]
    plan = plan_estimates(args.tokens) if args.plan else {}
    for r in rows:
        r["vs_memcpy"] = r["gb_per_s"] / base
        est = plan.get("estimates_ms", {}).get(r["transport"])
        if est is not None:
            r["plan_ms"], r["plan_over_measured"] = est, est / r["latency_ms_median"]
        print(f"{r['transport']:<36} {r['bytes'] / 2**20:7.1f} MiB  {r['latency_ms_median']:8.1f} ms  "
              f"{r['gb_per_s']:6.2f} GB/s  {r['vs_memcpy']:.2f}x memcpy"
              + (f"  plan {est:7.1f} ms ({r['plan_over_measured']:.2f}x)" if est is not None else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tokens": args.tokens, "rows": rows, "plan": plan}, f, indent=1)


def plan_estimates(tokens: int) -> dict:
    """What ``fleetlm plan --disagg --hardware cpu --probe`` estimates for this transfer."""
    import dataclasses

    from fleetlm.plan.hardware import get_hardware
    from fleetlm.plan.pd import HOST_COPIES, kv_link
    from fleetlm.plan.probe import probe

    pr = probe()
    hw = dataclasses.replace(get_hardware("cpu", mem_bandwidth=pr.mem_bandwidth, peak_flops=pr.peak_flops),
                             network_bw=pr.tcp_bandwidth, page_fault_bw=pr.fault_bandwidth)  # as `plan --probe`
    est = {}
    for t in HOST_COPIES:
        link = kv_link(t, hw)
        est[t] = 1e3 * (link.latency_s + nbytes_for(tokens) / link.bandwidth)
    return {"probe_read_gb_per_s": pr.mem_bandwidth / 1e9, "probe_tcp_gb_per_s": pr.tcp_bandwidth / 1e9,
            "probe_fault_gb_per_s": pr.fault_bandwidth / 1e9,
            "estimates_ms": est}


if __name__ == "__main__":
    main()
