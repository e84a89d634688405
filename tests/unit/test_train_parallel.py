"""Every parallel layout equals one process over 5 steps of a tiny random Llama in float32:
DDP (``replicate``), FSDP2 (``fully_shard``, ZeRO-3 and ZeRO-2-like, with activation
checkpointing, and with torch.compile), TP=2, PP=2 (GPipe, 1F1B) on 2 gloo ranks; FSDP x TP
and HSDP on 4; gradient accumulation and torch.compile in one process. Parameters are compared
after gathering (FSDP shards, TP slices).

Tolerance: rtol 2e-5 / atol 2e-6 on losses, rtol 1e-4 on gradient norms (AdamW is blind to a
gradient's scale, so the norm is what catches a sum taken for a mean), atol 5e-5 on parameters
(of size ~0.1, each moved ~1.5e-2 over the 5 steps). Only the order of float32 additions
differs (two ranks' mean gradients averaged vs one mean over all rows), ~1e-7 relative per
step; AdamW's division by sqrt(v) magnifies that on elements whose gradient is near zero
(measured: at most 2.4e-5).
"""

from __future__ import annotations

import socket

import pytest
import torch

BASE = ['model.size="tiny"', "data.max_files=3", "data.seq_len=32", "training.steps=5",
        "logging.progress=false", "optimizer.lr=3e-3", "schedule.warmup_steps=2"]


def free_port() -> int:
    for port in range(18400, 18500):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 18400-18499")


def run_ranks(world: int, overrides: list[str], tmp_path) -> tuple:
    """Train on ``world`` spawned gloo ranks; rank 0's losses and full parameters."""
    res = run_ranks_record(world, overrides, tmp_path)
    return res["losses"], res["norms"], res["params"]


def run_ranks_record(world: int, overrides: list[str], tmp_path) -> dict:
    """What rank 0 saved: losses, norms, params, and the graphs torch.compile built there."""
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_worker, args=(world, free_port(), overrides, str(out)), nprocs=world, join=True)
    return torch.load(out)


def _worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    import torch.distributed as dist

    from fleetlm.distributed.parallel_state import destroy_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        losses, norms, params = train_once(overrides)
        if rank == 0:
            torch.save({"losses": losses, "norms": norms, "params": params, "graphs": compiled_graphs()}, out)
        dist.barrier()  # no rank leaves while another is still in a collective
    finally:
        destroy_distributed()


def train_once(overrides: list[str]) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Losses, gradient norms and full (gathered) parameters after training with ``overrides``."""
    from fleetlm.train.config import load_config
    from fleetlm.train.export import full_state_dict
    from fleetlm.train.trainer import train

    r = train(load_config(None, BASE + overrides))
    return r.losses, [m.grad_norm for m in r.metrics], full_state_dict(r.trainer)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def reference():
    return train_once(["training.micro_batch=4"])


def assert_same(ref, got) -> None:
    (l1, n1, p1), (l2, n2, p2) = ref, got
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(torch.tensor(n2), torch.tensor(n1), rtol=1e-4, atol=0)
    assert sorted(p1) == sorted(p2)
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=0, atol=5e-5, msg=name)
    assert l1[-1] < l1[0]  # it trains


@pytest.mark.parametrize("layout", [
    ["parallelism.dp_replicate=2"],
    ["parallelism.dp_shard=2"],
    ["parallelism.dp_shard=2", "parallelism.reshard_after_forward=false",
     'parallelism.activation_checkpointing="full"'],
], ids=["ddp", "fsdp2", "fsdp2-zero2-ac"])
def test_data_parallel_equals_one_process(reference, layout, tmp_path):
    got = run_ranks(2, ["training.micro_batch=2"] + layout, tmp_path)
    assert_same(reference, got)


def test_compile_equals_eager(reference):
    """``parallelism.compile``: each decoder layer through torch.compile (inductor) gives the
    eager run's losses and parameters (inductor reorders float32 sums: measured 2.7e-5 at most
    on a parameter after AdamW, inside the tolerance), and graphs were really compiled."""
    before = compiled_graphs()
    got = train_once(["training.micro_batch=4", "parallelism.compile=true"])
    assert compiled_graphs() > before
    assert_same(reference, got)


def test_fsdp2_with_compile_equals_one_process(reference, tmp_path):
    """torchtitan's order, compile before FSDP2: compiled layers inside fully_shard units."""
    res = run_ranks_record(2, ["training.micro_batch=2", "parallelism.dp_shard=2", "parallelism.compile=true"],
                           tmp_path)
    assert res["graphs"] > 0
    assert_same(reference, (res["losses"], res["norms"], res["params"]))


def test_accumulation_equals_a_bigger_batch(reference):
    got = train_once(["training.micro_batch=2", "training.grad_accumulation=2"])
    assert_same(reference, got)


@pytest.mark.parametrize("layout", [
    ["parallelism.tp=2"],
    ["parallelism.pp=2", 'parallelism.pp_schedule="gpipe"', "parallelism.pp_microbatches=2"],
    ["parallelism.pp=2", 'parallelism.pp_schedule="1f1b"', "parallelism.pp_microbatches=4"],
], ids=["tp2", "pp2-gpipe", "pp2-1f1b"])
def test_model_parallel_equals_one_process(reference, layout, tmp_path):
    """TP=2 (every rank sees the whole batch; parameters gathered from both slices) and PP=2
    (the batch split into micro-batches through 2 stages)."""
    got = run_ranks(2, ["training.micro_batch=4"] + layout, tmp_path)
    if "parallelism.tp=2" in layout:
        assert_same(reference, got)
    else:  # rank 0 holds the first stage only
        l2, n2, p2 = got
        assert_same(reference, (l2, n2, {k: reference[2][k] for k in reference[2] if k not in p2} | p2))
        assert "model.layers.0.self_attn.qkv_proj.weight" in p2 and "lm_head.weight" not in p2


def test_fsdp_x_tp_on_four_ranks_equals_one_process(reference, tmp_path):
    """2-D mesh: FSDP2 over dp_shard=2, our TP layers over tp=2 (TP innermost)."""
    got = run_ranks(4, ["training.micro_batch=2", "parallelism.dp_shard=2", "parallelism.tp=2"], tmp_path)
    assert_same(reference, got)


def test_fsdp2_bf16_mixed_precision_tracks_float32(reference, tmp_path):
    """bf16 compute with float32 master weights and reduction: losses within bf16's ~3
    significant digits of the float32 run (not equal: every matmul rounds to 8 bits)."""
    losses, norms, params = run_ranks(2, ["training.micro_batch=2", "parallelism.dp_shard=2",
                                          'precision.param_dtype="bfloat16"'], tmp_path)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[0]), rtol=5e-3, atol=0)
    assert all(p.dtype == torch.float32 for p in params.values())
    assert losses != reference[0]


def test_hsdp_on_four_ranks_equals_one_process(reference, tmp_path):
    """HSDP: FSDP2 over a 2-D data-parallel mesh (replicate 2 x shard 2), one sequence per rank."""
    got = run_ranks(4, ["training.micro_batch=1", "parallelism.dp_shard=2", "parallelism.dp_replicate=2"], tmp_path)
    assert_same(reference, got)
