"""Each parallel layer on 2 gloo ranks against its single-process reference: the weight slice
each rank keeps from the full checkpoint tensor, and the layer's output."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F

TP = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _column(rank: int, g: torch.Generator) -> None:
    from fleetlm.layers.linear import ColumnParallelLinear

    w, b, x = torch.randn(8, 6, generator=g), torch.randn(8, generator=g), torch.randn(3, 6, generator=g)
    layer = ColumnParallelLinear(6, 8, bias=True, dtype=torch.float32, gather_output=True)
    layer.weight_loader(layer.weight, w)
    layer.weight_loader(layer.bias, b)
    assert torch.equal(layer.weight, w[rank * 4 : (rank + 1) * 4])
    torch.testing.assert_close(layer(x), F.linear(x, w, b))


def _merged(rank: int, g: torch.Generator) -> None:
    from fleetlm.layers.linear import MergedColumnParallelLinear

    gate, up, x = torch.randn(4, 6, generator=g), torch.randn(6, 6, generator=g), torch.randn(3, 6, generator=g)
    layer = MergedColumnParallelLinear(6, [4, 6], dtype=torch.float32)
    layer.weight_loader(layer.weight, gate, 0)
    layer.weight_loader(layer.weight, up, 1)
    expected = torch.cat([gate[rank * 2 : (rank + 1) * 2], up[rank * 3 : (rank + 1) * 3]])
    assert torch.equal(layer.weight, expected)
    torch.testing.assert_close(layer(x), F.linear(x, expected))


def _qkv(rank: int, g: torch.Generator, kv_heads: int) -> None:
    from fleetlm.layers.linear import QKVParallelLinear

    d, heads, hidden = 3, 4, 5
    q, k, v = (torch.randn(n * d, hidden, generator=g) for n in (heads, kv_heads, kv_heads))
    bq, bk, bv = (torch.randn(n * d, generator=g) for n in (heads, kv_heads, kv_heads))
    layer = QKVParallelLinear(hidden, d, heads, kv_heads, bias=True, dtype=torch.float32)
    for shard, w, b in (("q", q, bq), ("k", k, bk), ("v", v, bv)):
        layer.weight_loader(layer.weight, w, shard)
        layer.weight_loader(layer.bias, b, shard)
    kv = rank if kv_heads == TP else 0  # one KV head per rank, replicated when tp > kv heads
    my_q = q[rank * 2 * d : (rank + 1) * 2 * d]
    my_kv = slice(kv * d, (kv + 1) * d)
    assert layer.num_heads == 2 and layer.num_kv_heads == 1
    assert torch.equal(layer.weight, torch.cat([my_q, k[my_kv], v[my_kv]]))
    assert torch.equal(layer.bias, torch.cat([bq[rank * 2 * d : (rank + 1) * 2 * d], bk[my_kv], bv[my_kv]]))


def _row(rank: int, g: torch.Generator) -> None:
    from fleetlm.layers.linear import RowParallelLinear

    w, b, x = torch.randn(5, 8, generator=g), torch.randn(5, generator=g), torch.randn(3, 8, generator=g)
    layer = RowParallelLinear(8, 5, bias=True, dtype=torch.float32)
    layer.weight_loader(layer.weight, w)
    layer.weight_loader(layer.bias, b)
    assert torch.equal(layer.weight, w[:, rank * 4 : (rank + 1) * 4])
    torch.testing.assert_close(layer(x[:, rank * 4 : (rank + 1) * 4]), F.linear(x, w, b))  # bias added once


def _vocab(rank: int, g: torch.Generator) -> None:
    from fleetlm.layers.vocab import ParallelLMHead, VocabParallelEmbedding

    emb, ids, h = torch.randn(11, 4, generator=g), torch.tensor([0, 5, 6, 10, 3]), torch.randn(2, 4, generator=g)
    layer = VocabParallelEmbedding(11, 4, dtype=torch.float32)  # 11 = 6 + 5 rows: rank 1 padded
    layer.weight_loader(layer.weight, emb)
    assert torch.equal(layer.weight[: 6 - rank], emb[rank * 6 : rank * 6 + 6 - rank])
    torch.testing.assert_close(layer(ids), F.embedding(ids, emb))
    head = ParallelLMHead(11, 4, dtype=torch.float32, tie_to=layer)
    assert head.weight is layer.weight
    logits = head.compute_logits(h)
    if rank == 0:
        torch.testing.assert_close(logits, F.linear(h, emb))
    else:
        assert logits is None  # only TP rank 0 samples
    torch.testing.assert_close(head(h), F.linear(h, emb))  # training: every rank


def _row_grad(rank: int, g: torch.Generator) -> None:
    """Training through the TP layers: gradients of the sharded weights equal the slices of
    the single-process gradients."""
    from fleetlm.layers.linear import ColumnParallelLinear, RowParallelLinear

    w1, w2, x = torch.randn(8, 6, generator=g), torch.randn(6, 8, generator=g), torch.randn(3, 6, generator=g)
    col, row = ColumnParallelLinear(6, 8, dtype=torch.float32), RowParallelLinear(8, 6, dtype=torch.float32)
    col.weight_loader(col.weight, w1)
    row.weight_loader(row.weight, w2)
    col.weight.requires_grad_(True)
    row.weight.requires_grad_(True)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    row(F.silu(col(xa))).pow(2).sum().backward()
    r1, r2 = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
    F.linear(F.silu(F.linear(xb, r1)), r2).pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)  # the input's gradient sums every column shard
    torch.testing.assert_close(col.weight.grad, r1.grad[rank * 4 : (rank + 1) * 4])
    torch.testing.assert_close(row.weight.grad, r2.grad[:, rank * 4 : (rank + 1) * 4])


def _run(rank: int, port: int) -> None:
    from fleetlm.distributed.parallel_state import (
        ParallelConfig,
        destroy_distributed,
        init_distributed,
    )

    torch.set_num_threads(1)
    init_distributed(ParallelConfig(TP, 1), rank, torch.device("cpu"), init_method=f"tcp://127.0.0.1:{port}")
    try:
        g = torch.Generator().manual_seed(0)  # the same "checkpoint" on every rank
        _column(rank, g)
        _merged(rank, g)
        _qkv(rank, g, kv_heads=2)
        _qkv(rank, g, kv_heads=1)
        _row(rank, g)
        _vocab(rank, g)
        _row_grad(rank, g)
    finally:
        destroy_distributed()


def test_parallel_layers_match_single_process_reference():
    torch.multiprocessing.spawn(_run, args=(_port(),), nprocs=TP, join=True)


def test_head_split_errors_name_both_numbers():
    from fleetlm.layers.linear import check_heads_divisible

    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not divide the model's 9 attention heads"):
        check_heads_divisible(9, 3, 2)
    with pytest.raises(ValueError, match="tensor_parallel_size 4 neither divides nor is a multiple of the model's 6"):
        check_heads_divisible(12, 6, 4)
    check_heads_divisible(9, 3, 9)  # 3 ranks share each KV head


@pytest.mark.parametrize("make,shard,shape,match", [
    (lambda: __import__("fleetlm.layers.linear", fromlist=["x"]).ColumnParallelLinear(6, 8, dtype=torch.float32),
     None, (12, 6), r"weight has shape \(12, 6\), expected \(8, 6\)"),
    (lambda: __import__("fleetlm.layers.linear", fromlist=["x"]).RowParallelLinear(8, 5, dtype=torch.float32),
     None, (5, 16), r"weight has shape \(5, 16\), expected \(5, 8\)"),
    (lambda: __import__("fleetlm.layers.linear", fromlist=["x"]).QKVParallelLinear(5, 3, 4, 2, dtype=torch.float32),
     "k", (12, 5), r"weight shard k has shape \(12, 5\), expected \(6, 5\)"),
    (lambda: __import__("fleetlm.layers.linear", fromlist=["x"]).MergedColumnParallelLinear(6, [4, 6], dtype=torch.float32),
     1, (4, 6), r"weight shard 1 has shape \(4, 6\), expected \(6, 6\)"),
], ids=["column", "row", "qkv", "merged"])
def test_a_misshaped_checkpoint_tensor_is_refused_before_slicing(make, shard, shape, match):
    """Even where a rank keeps only a slice, the full tensor must have the model's shape: a
    checkpoint whose config disagrees with its tensors never loads silently."""
    layer = make()
    with pytest.raises(ValueError, match=match):
        layer.weight_loader(layer.weight, torch.zeros(shape), shard)
