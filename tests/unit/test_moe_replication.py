"""Hot-expert replication: the placement and the adaptive routing on hand-checked loads, the
imbalance goal on a skewed load, and on 2 gloo ranks a layer that rebalances while running and
still computes exactly the single-process output."""

from __future__ import annotations

import random

import pytest
import torch

from fleetlm.moe.config import MoEConfig, check_runtime
from fleetlm.moe.replication import (
    _water_fill,
    assign_copies,
    owner_placement,
    plan_replicas,
    rank_imbalance,
)
from tests.unit.test_moe_layer import (
    INTER,
    H,
    _capacity_reference,
    _layer,
    _port,
    _reference,
    _weights,
)


def test_water_fill_levels_the_bins():
    assert _water_fill([5, 0], 10) == [3, 7]  # ends at 8 / 7
    assert _water_fill([0, 0, 0], 7) == [3, 2, 2]
    assert _water_fill([3, 1, 0], 3) == [0, 1, 2]  # ends at 3 / 2 / 2
    assert _water_fill([0, 9], 4) == [4, 0]


def test_hottest_expert_gets_a_copy_on_the_least_loaded_rank():
    # 8 experts on 2 ranks (0-3 on rank 0); expert 0 carries most of the load
    p = plan_replicas([80, 4, 4, 4, 4, 2, 1, 1], ep=2, slots=1)
    assert p.copies[0] == ((0, 0), (1, 4))  # owner first, then rank 1's spare slot 4
    assert p.replicated() == (0,) and p.slot_experts(1) == [0] and p.slot_experts(0) == [-1]
    ids = torch.tensor([[0]] * 80 + [[1]] * 4 + [[5]] * 2)
    rank, slot, load = assign_copies(ids, p)
    # without copies: rank 0 = 84, rank 1 = 2; with: expert 0's 80 split so both reach 43
    assert load == [43, 43]
    assert (rank[:80] == 1).sum() == 41 and set(slot[:80][rank[:80] == 1].tolist()) == {4}
    assert assign_copies(ids, owner_placement(8, 2, 1))[2] == [84, 2]


def test_replication_brings_a_skewed_load_under_the_goal():
    """The figure's goal: rank imbalance >= 2 without copies, <= 1.25 with them (16 experts on 8
    ranks, two spare slots each, a Zipf-like skew where two experts take most tokens)."""
    rng = random.Random(0)
    weights = [1 / (i + 1) ** 1.6 for i in range(16)]
    ids = torch.tensor([rng.choices(range(16), weights)[0] for _ in range(4096)]).unsqueeze(-1)
    load = torch.bincount(ids.flatten(), minlength=16).tolist()
    before = rank_imbalance(assign_copies(ids, owner_placement(16, 8, 2))[2])
    after = rank_imbalance(assign_copies(ids, plan_replicas(load, 8, 2))[2])
    assert before >= 2.0 and after <= 1.25, (before, after)


@pytest.mark.parametrize("kw,match", [
    ({"replica_slots": -1}, "moe_replica_slots must be an integer >= 0, got -1"),
    ({"rebalance_interval": 1.5}, "moe_rebalance_interval must be an integer >= 0"),
])
def test_bad_replication_arguments_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        check_runtime(None, "reroute", "all_to_all", **{"replica_slots": 0, "rebalance_interval": 0, **kw})


def test_replication_without_expert_parallelism_is_refused():
    from fleetlm.moe.config import check_moe_parallel

    with pytest.raises(ValueError, match="moe_replica_slots needs enable_expert_parallel over 2\\+"):
        check_moe_parallel(MoEConfig(8, 2, 16, replica_slots=1), 1, False)
    with pytest.raises(ValueError, match="moe_rebalance_interval needs moe_replica_slots > 0"):
        check_moe_parallel(MoEConfig(8, 2, 16, rebalance_interval=4), 2, True)


def _run(rank: int, port: int) -> None:
    from fleetlm.distributed.parallel_state import (
        ParallelConfig,
        destroy_distributed,
        init_distributed,
    )
    from fleetlm.moe.replication import rank_imbalance

    torch.set_num_threads(1)
    init_distributed(ParallelConfig(2, 1), rank, torch.device("cpu"), init_method=f"tcp://127.0.0.1:{port}")
    try:
        g = torch.Generator().manual_seed(0)
        w = _weights(g)
        x = torch.randn(40, H, generator=g)
        logits = torch.randn(40, 8, generator=g)
        logits[:, 1] += 4.0  # expert 1 (rank 0) is hot
        cfg = MoEConfig(8, 2, INTER, expert_parallel=True, replica_slots=1, rebalance_interval=1)
        layer = _layer(cfg, w)
        with torch.no_grad():
            first = layer(x, logits)  # forward 1 rebalances from no load: owners only
            before = list(layer.stats.rank_tokens)
            second = layer(x, logits)  # forward 2: expert 1 copied to rank 1's spare slot
        assert layer.replication.placement.replicated() == (1,) and layer.replication.rebalances == 1
        after = [b - a for a, b in zip(before, layer.stats.rank_tokens)]
        assert rank_imbalance(after) < rank_imbalance(before) and rank_imbalance(after) <= 1.25
        for out in (first, second):
            torch.testing.assert_close(out, _reference(x, logits, w, 2, True), rtol=1e-5, atol=1e-5)
        cap = _layer(MoEConfig(8, 2, INTER, expert_parallel=True, replica_slots=1, rebalance_interval=1,
                               capacity_factor=0.5, overflow_policy="reroute"), w)
        with torch.no_grad():
            for _ in range(2):  # capacity and replication together
                torch.testing.assert_close(cap(x, logits), _capacity_reference(x, logits, w, "reroute"),
                                           rtol=1e-5, atol=1e-5)
    finally:
        destroy_distributed()


def test_rebalancing_layer_matches_one_process_on_two_ranks():
    torch.multiprocessing.spawn(_run, args=(_port(),), nprocs=2, join=True)
