"""Training throughput, MFU and peak memory per rank for each parallel strategy on this CPU,
next to ``fleetlm plan``'s training-mode figures for the same configuration.

Fixed workload: the ``small`` preset (hidden 256, 6 layers, vocabulary 49,152, untied head), float32,
sequences of 128 tokens from the Python standard library, 4 sequences per step (each
data-parallel rank takes 4 / dp), AdamW, 6 steps of which the first 2 are warm-up.
Every rank gets one thread; one process gets all of them.

Memory, three measures per rank, each its largest value during the steps minus its value just
before the model is built (libraries and tokenizer excluded):
- tensors (``--tensor-peak``, a second run of each strategy under ``fleetlm.train.memory.
  TensorMemoryTrace``, steps 2-3): the live CPU tensor bytes, exactly (every allocation and free
  replayed in order); the CPU counterpart of ``torch.cuda.max_memory_allocated``, and what the
  planner predicts;
- allocated (steps 2-6, sampled every 2 ms): the bytes glibc's malloc has handed out and not had back (``mallinfo2``: in-use
  heap chunks plus mmapped chunks), i.e. the live tensors and buffers, the CPU counterpart of
  tensors plus the non-tensor heap (gloo buffers, Python objects), sampled (Linux with glibc only);
- resident (RSS): allocated plus what the allocator keeps after a free (heap pages it has not
  returned to the system, fragmentation), the counterpart of CUDA's reserved memory.
The lifetime RSS peak, which includes building the full model before sharding, is recorded
beside them. Planner: states + activations for this strategy (float32 activations:
``act_bytes = 4``).

    flock /tmp/fleetlm-bench.lock python benchmarks/train_strategies.py --out benchmarks/train_strategies.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

BASE = ['model.size="small"', "data.max_tokens=60000", "data.seq_len=128", "training.steps=6",
        "logging.progress=false", "training.max_grad_norm=1.0"]
STRATEGIES = {  # name -> (world, overrides, planner strategy)
    "single": (1, ["training.micro_batch=4"], "ddp"),
    "ddp": (2, ["training.micro_batch=2", "parallelism.dp_replicate=2"], "ddp"),
    "fsdp2": (2, ["training.micro_batch=2", "parallelism.dp_shard=2"], "fsdp2"),
    "fsdp2+ac": (2, ["training.micro_batch=2", "parallelism.dp_shard=2",
                     'parallelism.activation_checkpointing="full"'], "fsdp2"),
    "tp2": (2, ["training.micro_batch=4", "parallelism.tp=2"], "ddp"),
    "pp2-gpipe": (2, ["training.micro_batch=4", "parallelism.pp=2", 'parallelism.pp_schedule="gpipe"',
                      "parallelism.pp_microbatches=2"], "ddp"),
    "pp2-1f1b": (2, ["training.micro_batch=4", "parallelism.pp=2", 'parallelism.pp_schedule="1f1b"',
                     "parallelism.pp_microbatches=2"], "ddp"),
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    return f


_MALLINFO2 = _mallinfo2()


def allocated_bytes() -> int:
    """Bytes malloc has handed out and not had back, over all arenas (0 without glibc)."""
    if _MALLINFO2 is None:
        return 0
    m = _MALLINFO2()
    return m.uordblks + m.hblkhd


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """The largest resident set seen while training steps run (polled every 2 ms), so the
    one-off peak of building the model (full tensors before sharding) is not counted."""

    def __init__(self) -> None:
        import threading

        self.peak, self.peak_allocated, self._stop = rss_bytes(), allocated_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())
            self.peak_allocated = max(self.peak_allocated, allocated_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def fp32_peak_flops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(6):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best


def _overrides(name: str) -> list[str]:
    return [*BASE, *STRATEGIES[name][1]]


def tensor_peak_worker(rank: int, world: int, port: int, name: str, out: str, threads: int) -> None:
    import torch.distributed as dist

    from fleetlm.train.config import load_config
    from fleetlm.train.memory import TensorMemoryTrace
    from fleetlm.train.trainer import Trainer

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config(None, _overrides(name))
    with TensorMemoryTrace() as trace:
        with trace.window():
            pass  # the live bytes before the model is built
        tr = Trainer(cfg)
        tr.train_step()
        with trace.window():
            tr.train_step()
            tr.train_step()
    Path(out, f"{name}.{rank}.json").write_text(json.dumps({"tensor_peak_bytes": trace.peak - trace.live_at_window}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def tensor_peaks(name: str, threads_total: int) -> list[int]:
    world = STRATEGIES[name][0]
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(tensor_peak_worker, args=(world, free_port(), name, out, max(1, threads_total // world)),
                                    nprocs=world, join=True)
        return [json.loads(Path(out, f"{name}.{r}.json").read_text())["tensor_peak_bytes"] for r in range(world)]


def worker(rank: int, world: int, port: int, name: str, out: str, threads: int) -> None:
    import torch.distributed as dist

    from fleetlm.train.config import load_config
    from fleetlm.train.model import _tokenizer
    from fleetlm.train.trainer import Trainer

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config(None, _overrides(name))
    _warm_imports(_tokenizer(cfg.model.tokenizer))
    base, base_allocated = rss_bytes(), allocated_bytes()
    tr = Trainer(cfg)
    rows = [tr.train_step()]  # the first step allocates AdamW's state
    sampler = RssSampler()
    rows += [tr.train_step() for _ in range(cfg.training.steps - 1)]
    peak = sampler.stop() - base
    allocated = sampler.peak_allocated - base_allocated if _MALLINFO2 is not None else None
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    Path(out, f"{name}.{rank}.json").write_text(json.dumps({
        "rank": rank, "peak_bytes": peak, "peak_allocated_bytes": allocated, "lifetime_peak_bytes": lifetime, "step_s": [m.seconds for m in rows], "loss": rows[-1].loss,
        "tokens_per_step": rows[-1].tokens, "flops_per_token": tr.flops_per_token,
        "hf_config": tr.tm.hf_config}))
    if world > 1:
        dist.destroy_process_group()


def _warm_imports(tok) -> None:
    """Import what training imports lazily (AdamW pulls in torch._dynamo, ~130 MiB of modules;
    the distributed wrappers; the tokenizer's first call) so the base excludes libraries."""
    import torch.distributed._composable  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.pipelining  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    tok.encode("def f(x):\n    return x\n")


def free_port() -> int:
    with socket.socket() as s:
        for port in range(18450, 18500):
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def planner(hf: dict, strategy: str, world: int, name: str, micro: int, seq: int, peak: float) -> dict:
    from fleetlm.plan.hardware import get_hardware
    from fleetlm.plan.model_load import spec_from_config
    from fleetlm.plan.training import strategy_memory, training_compute

    m = spec_from_config(hf, name="small")
    hw = get_hardware("cpu", mem_bandwidth=10e9, peak_flops=peak)
    tp = 2 if name == "tp2" else 1
    pp = 2 if name.startswith("pp2") else 1
    dp = world // (tp * pp)
    sm = strategy_memory(m, hw, strategy, dp=dp, tp=tp, pp=pp, seq_len=seq, micro_batch=micro, act_bytes=4)
    ck = "+ac" in name
    c = training_compute(m, hw, world, tokens=1e6, mfu=0.4, seq_len=seq)
    return {"memory_bytes": sm.total_ckpt if ck else sm.total, "states_bytes": sm.states,
            "activation_bytes": sm.activations_ckpt if ck else sm.activations,
            "tokens_per_s_at_mfu_0.4": 1e6 / c.wallclock_s}


def run(name: str, threads_total: int, peak_1t: float) -> dict:
    world, overrides, strategy = STRATEGIES[name]
    threads = max(1, threads_total // world)
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(worker, args=(world, free_port(), name, out, threads), nprocs=world, join=True)
        ranks = [json.loads(Path(out, f"{name}.{r}.json").read_text()) for r in range(world)]
    step_s = statistics.median(ranks[0]["step_s"][2:])
    tokens = ranks[0]["tokens_per_step"]
    micro = int(next(o for o in overrides if o.startswith("training.micro_batch")).split("=")[1])
    peak = peak_1t * threads * world
    tps = tokens / step_s
    plan = planner(ranks[0]["hf_config"], strategy, world, name, micro, 128, peak_1t * threads)
    return {"strategy": name, "world": world, "micro_batch": micro, "hf_config": ranks[0]["hf_config"], "threads_per_rank": threads, "tokens_per_s": tps,
            "mfu": tps * ranks[0]["flops_per_token"] / peak, "final_loss": ranks[0]["loss"],
            "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
            "peak_allocated_bytes_per_rank": [r["peak_allocated_bytes"] for r in ranks],
            "lifetime_peak_bytes_per_rank": [r["lifetime_peak_bytes"] for r in ranks], "planner": plan}


def replan(path: str) -> dict:
    """Recompute the planner's columns of an earlier run (measurements unchanged)."""
    from fleetlm.models.loader import config_from_hf
    from fleetlm.train.model import PRESETS, _tokenizer, hf_config_dict

    tok = _tokenizer("smollm2-135m-instruct")
    hf = dict(PRESETS["small"], architectures=["LlamaForCausalLM"], vocab_size=tok.vocab_size)
    small = hf_config_dict(config_from_hf(hf), tok, 2048)
    result = json.loads(Path(path).read_text())
    for r in result["rows"]:
        world, overrides, strategy = STRATEGIES[r["strategy"]]
        r.setdefault("hf_config", small)
        r.setdefault("micro_batch", int(next(o for o in overrides if "micro_batch" in o).split("=")[1]))
        r["planner"] = planner(r["hf_config"], strategy, world, r["strategy"], r["micro_batch"], 128,
                               result["fp32_peak_flops_per_thread"] * r["threads_per_rank"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/train_strategies.json")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--replan", action="store_true", help="only recompute the planner columns of --out")
    ap.add_argument("--tensor-peak", action="store_true",
                    help="only add each strategy's exact live tensor peak per rank to --out (a profiled run)")
    args = ap.parse_args()
    if args.replan:
        result = replan(args.out)
    elif args.tensor_peak:
        result = json.loads(Path(args.out).read_text())
        for r in result["rows"]:
            r["tensor_peak_bytes_per_rank"] = tensor_peaks(r["strategy"], result["threads"])
    else:
        threads = len(os.sched_getaffinity(0))
        peak_1t = fp32_peak_flops(1)
        load = os.getloadavg()
        rows = [run(n, threads, peak_1t) for n in (args.only or STRATEGIES)]
        result = {"cpu": _cpu(), "threads": threads, "fp32_peak_flops_per_thread": peak_1t,
                  "load_before": load, "load_after": os.getloadavg(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    for r in result["rows"]:
        p = r["planner"]
        mem = max(r["peak_bytes_per_rank"])
        alloc = max(r.get("peak_allocated_bytes_per_rank") or [None], key=lambda v: v or 0)
        a = f"allocated {alloc / 2**20:7.1f} MiB ({alloc / p['memory_bytes'] - 1:+.0%})  " if alloc else ""
        if r.get("tensor_peak_bytes_per_rank"):
            tp = max(r["tensor_peak_bytes_per_rank"])
            a = f"tensors {tp / 2**20:7.1f} MiB ({tp / p['memory_bytes'] - 1:+.0%})  " + a
        print(f"{r['strategy']:10s} {r['tokens_per_s']:8.0f} tok/s  MFU {r['mfu']:.3f}  planner "
              f"{p['memory_bytes'] / 2**20:7.1f} MiB  {a}RSS {mem / 2**20:7.1f} MiB "
              f"({mem / p['memory_bytes'] - 1:+.0%})  planner tok/s@MFU0.4 {p['tokens_per_s_at_mfu_0.4']:.0f}")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
