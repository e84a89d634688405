"""Memory per rank, measured, against ``fleetlm plan``'s training mode for the same configuration.

Measured: the most live CPU tensor bytes during two training steps (``TensorMemoryTrace``: every
allocation and free, so the figure is exact and the same on every run), minus the live bytes
just before the model is built. Planner: ``strategy_memory`` for the same model, layout,
micro-batch and float32 (``act_bytes=4``). The model is the ``small`` preset (hidden 256, 6
layers, vocabulary 49,152, untied), whose embedding and head make up most of it, which is what
tells the strategies apart. Bound: within 15% (the issue's goal); the planner models activations
per layer and logits, not every temporary, and the measured gaps are at most 9% (DDP: 633 MiB
measured, 581 planned).
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_train_parallel import free_port

BASE = ['model.size="small"', "data.max_files=12", "data.seq_len=128", "training.steps=3",
        "logging.progress=false"]
LAYOUTS = {  # name -> (world, overrides, planner strategy, tp)
    "one-process": (1, ["training.micro_batch=4"], "ddp", 1),
    "ddp": (2, ["training.micro_batch=2", "parallelism.dp_replicate=2"], "ddp", 1),
    "fsdp2": (2, ["training.micro_batch=2", "parallelism.dp_shard=2"], "fsdp2", 1),
    "tp2": (2, ["training.micro_batch=4", "parallelism.tp=2"], "ddp", 2),
}


def measure(overrides: list[str]) -> dict:
    """Peak live tensor bytes in steps 2-3 over those before the model was built, and the model's
    Hugging Face config (for the planner)."""
    from fleetlm.train.config import load_config
    from fleetlm.train.memory import TensorMemoryTrace
    from fleetlm.train.trainer import Trainer

    cfg = load_config(None, BASE + overrides)
    with TensorMemoryTrace() as trace:
        with trace.window():
            pass  # marks the start: live bytes before the model is built
        tr = Trainer(cfg)
        tr.train_step()
        with trace.window():
            tr.train_step()
            tr.train_step()
    return {"peak_bytes": trace.peak - trace.live_at_window, "hf_config": tr.tm.hf_config}


def planned(hf: dict, strategy: str, world: int, tp: int, micro: int) -> float:
    from fleetlm.plan.hardware import get_hardware
    from fleetlm.plan.model_load import spec_from_config
    from fleetlm.plan.training import strategy_memory

    m = spec_from_config(hf, name="small")
    hw = get_hardware("cpu", mem_bandwidth=10e9, peak_flops=1e11)  # neither enters the memory figure
    sm = strategy_memory(m, hw, strategy, dp=world // tp, tp=tp, seq_len=128, micro_batch=micro, act_bytes=4)
    return sm.total - sm.overhead


def _worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    import torch.distributed as dist

    from fleetlm.distributed.parallel_state import destroy_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        got = measure(overrides)
        if rank == 0:
            torch.save(got, out)
        dist.barrier()
    finally:
        destroy_distributed()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_measured_memory_per_rank_matches_the_planner(name, tmp_path):
    world, overrides, strategy, tp = LAYOUTS[name]
    if world == 1:
        got = measure(overrides)
    else:
        out = tmp_path / "rank0.pt"
        torch.multiprocessing.spawn(_worker, args=(world, free_port(), overrides, str(out)), nprocs=world, join=True)
        got = torch.load(out)
    micro = int(overrides[0].split("=")[1])
    plan = planned(got["hf_config"], strategy, world, tp, micro)
    print(f"{name}: measured {got['peak_bytes'] / 2**20:.1f} MiB, planner {plan / 2**20:.1f} MiB")
    assert got["peak_bytes"] == pytest.approx(plan, rel=0.15), (got["peak_bytes"] / 2**20, plan / 2**20)
