"""Context parallelism (train/context_parallel.py) equals one process over 5 steps of a tiny
random Llama in float32: CP=2 on 2 gloo ranks and FSDP x CP (dp_shard=2 x cp=2) on 4.

Tolerance: the same as the other layouts (tests/unit/test_train_parallel.py): rtol 2e-5 /
atol 2e-6 on losses, rtol 1e-4 on gradient norms, atol 5e-5 on parameters. Not 0 because
the float32 additions happen in another order: each chunk's attention is a masked SDPA over
a prefix of the keys (one causal SDPA over the whole sequence in one process), the loss is the
mean of per-rank means, and the gradient is summed over ranks (the all-gather's backward for
K/V, the data-parallel all-reduce for the parameters).
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_train_parallel import assert_same, run_ranks, train_once

CP = ["data.seq_len=32", "parallelism.cp=2"]


@pytest.fixture(scope="module")
def reference():
    return train_once(["training.micro_batch=4"])


def test_cp2_equals_one_process(reference, tmp_path):
    """Each rank holds chunks (i, 3 - i) of 4 per sequence; RoPE at global positions, keys
    and values gathered; gradients averaged over the CP ranks."""
    got = run_ranks(2, ["training.micro_batch=4"] + CP, tmp_path)
    assert_same(reference, got)


def test_fsdp_x_cp_on_four_ranks_equals_one_process(reference, tmp_path):
    """2-D mesh (dp_shard=2, cp=2): two sequences per data-parallel rank, each split over 2
    CP ranks; FSDP2 shards over the flattened dp_shard x cp mesh."""
    got = run_ranks(4, ["training.micro_batch=2", "parallelism.dp_shard=2"] + CP, tmp_path)
    assert_same(reference, got)


def test_shard_chunks_and_positions():
    from fleetlm.train.context_parallel import CPShard

    x = torch.arange(16)[None]
    parts = [CPShard(r, 2).split(x) for r in range(2)]
    assert parts[0].tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert parts[1].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert CPShard(1, 2).positions(16).tolist() == list(range(4, 12))
    assert torch.equal(CPShard(0, 2).natural_order(tuple(parts)), x)


@pytest.mark.parametrize("override,match", [
    (["data.seq_len=30"], r"parallelism.cp = 2 needs data.seq_len \(30\) divisible by 2 x cp = 4"),
    (["parallelism.tp=2"], "composes with dp_shard"),
    (["parallelism.dp_replicate=2"], "not dp_replicate"),
    (["lora.r=4"], "LoRA with parallelism.cp"),
])
def test_bad_cp_layout_is_refused_before_any_step(override, match):
    """Checked by the config itself: no process group, model or step needed."""
    from fleetlm.train.config import load_config

    with pytest.raises(ValueError, match=match):
        load_config(None, ['model.size="tiny"', "data.seq_len=32", "parallelism.cp=2"] + override)
