"""Context parallelism on this CPU: tokens/s and peak memory per rank of CP=2 against one process
on 2,048-token sequences of the ``tiny`` preset (hidden 64, 4 layers, 4/2 heads, vocabulary
49,152 untied), float32, one sequence per step, AdamW, 6 steps of which the first 2 are warm-up.

Tokens/s from the median step time of steps 3-6, and from the fastest of them (less sensitive to
other work on shared cores). Rows: one process with 2 threads, one process with 1 thread, CP=2 (2 ranks x 1 thread). Memory:
a rank's largest resident set during the steps minus its resident set before the model is built
(as ``train_strategies.py`` measures it).

    flock /tmp/fleetlm-bench.lock python benchmarks/train_cp.py --out benchmarks/train_cp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.train_strategies import RssSampler, _warm_imports, free_port, rss_bytes

SEQ = 2048
BASE = ['model.size="tiny"', "data.max_tokens=40000", f"data.seq_len={SEQ}", "training.steps=6",
        "training.micro_batch=1", "logging.progress=false"]
ROWS = {"single-2t": (1, 2, []), "single-1t": (1, 1, []), "cp2": (2, 1, ["parallelism.cp=2"])}


def worker(rank: int, world: int, port: int, name: str, out: str, threads: int) -> None:
    import torch.distributed as dist

    from fleetlm.train.config import load_config
    from fleetlm.train.model import _tokenizer
    from fleetlm.train.trainer import Trainer

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config(None, BASE + ROWS[name][2])
    _warm_imports(_tokenizer(cfg.model.tokenizer))
    base = rss_bytes()
    tr = Trainer(cfg)
    rows = [tr.train_step()]
    sampler = RssSampler()
    rows += [tr.train_step() for _ in range(cfg.training.steps - 1)]
    Path(out, f"{name}.{rank}.json").write_text(json.dumps({
        "step_s": [m.seconds for m in rows], "tokens": rows[-1].tokens, "losses": [m.loss for m in rows],
        "peak_bytes": sampler.stop() - base}))
    if world > 1:
        dist.destroy_process_group()


def run(name: str) -> dict:
    world, threads, _ = ROWS[name]
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(worker, args=(world, free_port(), name, out, threads), nprocs=world, join=True)
        ranks = [json.loads(Path(out, f"{name}.{r}.json").read_text()) for r in range(world)]
    step_s = statistics.median(ranks[0]["step_s"][2:])
    return {"row": name, "ranks": world, "threads_per_rank": threads, "step_s": step_s,
            "step_s_all": [round(s, 3) for s in ranks[0]["step_s"]],
            "tokens_per_s": ranks[0]["tokens"] / step_s,
            "tokens_per_s_best_step": ranks[0]["tokens"] / min(ranks[0]["step_s"][2:]), "losses": ranks[0]["losses"],
            "peak_mib_per_rank": [round(r["peak_bytes"] / 2**20) for r in ranks]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/train_cp.json")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    rows = [run(name) for name in ROWS]
    result = {"seq_len": SEQ, "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0], "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['row']:10s} {r['ranks']}x{r['threads_per_rank']}  {r['tokens_per_s']:8.0f} tok/s "
              f"(best step {r['tokens_per_s_best_step']:.0f})  "
              f"peak {r['peak_mib_per_rank']} MiB  loss {r['losses'][-1]:.4f}")
    print(f"load {result['load_1min_before']:.1f} -> {result['load_1min_after']:.1f}")


if __name__ == "__main__":
    main()
