"""The fused MoE layer against a plain per-token reference, its capacity rule against
hand-computed counts, and its parallel layouts (TP, EP with all-to-all and with all-reduce
dispatch) on 2 gloo ranks against one process."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F

from fleetlm.moe.config import MoEConfig, check_moe_parallel, check_runtime

E, K, H, INTER = 8, 2, 12, 16


def _weights(g: torch.Generator, e: int = E) -> dict[int, dict[str, torch.Tensor]]:
    return {x: {"gate": torch.randn(INTER, H, generator=g), "up": torch.randn(INTER, H, generator=g),
                "down": torch.randn(H, INTER, generator=g)} for x in range(e)}


def _layer(moe: MoEConfig, w: dict) -> torch.nn.Module:
    from fleetlm.layers.moe import FusedMoE

    layer = FusedMoE(moe, H, torch.float32)
    for e, parts in w.items():
        for kind, t in parts.items():
            param = layer.w2_weight if kind == "down" else layer.w13_weight
            layer.weight_loader(param, t, (e, kind))
    return layer


def _reference(x: torch.Tensor, logits: torch.Tensor, w: dict, k: int, renorm: bool) -> torch.Tensor:
    """Token by token, expert by expert: what the model means."""
    probs = torch.softmax(logits, -1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top, ids = torch.topk(probs[t], k)
        if renorm:
            top = top / top.sum()
        for p, e in zip(top.tolist(), ids.tolist()):
            h = F.silu(x[t] @ w[e]["gate"].T) * (x[t] @ w[e]["up"].T)
            out[t] += p * (h @ w[e]["down"].T)
    return out


@pytest.mark.parametrize("renorm", [True, False])
def test_grouped_experts_equal_the_per_token_reference(renorm):
    g = torch.Generator().manual_seed(0)
    w, x, logits = _weights(g), torch.randn(23, H, generator=g), torch.randn(23, E, generator=g)
    layer = _layer(MoEConfig(E, K, INTER, norm_topk_prob=renorm), w)
    torch.testing.assert_close(layer(x, logits), _reference(x, logits, w, K, renorm), rtol=1e-5, atol=1e-5)
    stats = layer.stats.snapshot()
    assert sum(stats.tokens) == 23 * K and stats.dropped == stats.rerouted == 0


def _skewed_logits() -> torch.Tensor:
    """6 tokens, 4 experts, k = 1. Tokens 0-4 prefer expert 0, then 1, then 2; token 5 prefers 3."""
    rows = [[4.0, 3.0, 2.0, 1.0]] * 5 + [[1.0, 2.0, 3.0, 4.0]]
    return torch.tensor(rows)


def test_capacity_counts_equal_hand_computed_ones():
    from fleetlm.moe.routing import apply_capacity, expert_capacity, topk_gate

    logits = _skewed_logits()
    assert expert_capacity(6, 1, 4, 1.0) == 2  # ceil(1.0 * 6 * 1 / 4)
    routing, probs = topk_gate(logits, 1, renormalize=True)
    # drop: expert 0 keeps tokens 0, 1; tokens 2, 3, 4 overflow and are dropped
    d = apply_capacity(routing, probs, 1.0, "drop")
    assert (d.dropped, d.rerouted) == (3, 0)
    assert d.ids[:, 0].tolist() == [0, 0, -1, -1, -1, 3]
    # reroute: tokens 2, 3 -> expert 1 (next best, room 2); token 4 -> expert 2 (1 is full)
    r = apply_capacity(routing, probs, 1.0, "reroute")
    assert (r.dropped, r.rerouted) == (0, 3)
    assert r.ids[:, 0].tolist() == [0, 0, 1, 1, 2, 3]
    # a rerouted slot keeps its weight (1.0: k = 1, renormalised); a dropped one weighs 0
    assert r.weights[:, 0].tolist() == [1.0] * 6
    assert d.weights[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # factor 0.5: capacity 1; 0 <- token 0; 1 <- 1; 2 <- 2; 3 <- 5 (first choices first); 3, 4 find no room
    r = apply_capacity(routing, probs, 0.5, "reroute")
    assert (r.dropped, r.rerouted) == (2, 2)
    assert r.ids[:, 0].tolist() == [0, 1, 2, -1, -1, 3]


def test_capacity_with_top2_gives_first_choices_priority():
    from fleetlm.moe.routing import apply_capacity, topk_gate

    # 4 tokens, 4 experts, k = 2, capacity ceil(1 * 4 * 2 / 4) = 2. First choices: 0, 0, 0, 1;
    # second choices: 1, 1, 1, 0. Expert 0 keeps tokens 0, 1 (first choices); token 2's first
    # choice overflows; expert 1 takes token 3 (first) then token 0 (second); tokens 1, 2's
    # seconds overflow. Drop: 3 dropped, and token 3's second (expert 0) overflows too: 4.
    logits = torch.tensor([[5.0, 4, 1, 0], [5.0, 4, 0, 1], [5.0, 4, 1, 0], [4.0, 5, 1, 0]])
    routing, probs = topk_gate(logits, 2, renormalize=False)
    d = apply_capacity(routing, probs, 1.0, "drop")
    assert d.dropped == 4
    assert d.ids.tolist() == [[0, 1], [0, -1], [-1, -1], [1, -1]]
    r = apply_capacity(routing, probs, 1.0, "reroute")
    # in priority order: token 2 slot 0 -> expert 2; token 1 slot 1 -> 3; token 2 slot 1 -> 2 is
    # its own, 3 has room 1 -> 3; token 3 slot 1 -> 2 (room 1 left)
    assert r.ids.tolist() == [[0, 1], [0, 3], [2, 3], [1, 2]]
    assert (r.dropped, r.rerouted) == (0, 4)


@pytest.mark.parametrize("kw,match", [
    ({"capacity_factor": 0.0}, "moe_capacity_factor must be > 0, got 0.0"),
    ({"capacity_factor": -1}, "moe_capacity_factor must be > 0"),
    ({"overflow_policy": "spill"}, "moe_overflow_policy must be one of drop, reroute, got 'spill'"),
    ({"ep_dispatch": "p2p"}, "moe_ep_dispatch must be one of all_to_all, all_reduce"),
])
def test_bad_moe_arguments_are_refused(kw, match):
    args = {"capacity_factor": None, "overflow_policy": "reroute", "ep_dispatch": "all_to_all", **kw}
    with pytest.raises(ValueError, match=match):
        check_runtime(**args)


def test_bad_moe_layouts_and_engine_args_are_refused():
    from fleetlm.config import EngineArgs

    with pytest.raises(ValueError, match="expert parallel size 3 .* does not divide the model's 8 experts"):
        check_moe_parallel(MoEConfig(8, 2, 16), 3, True)
    with pytest.raises(ValueError, match="enable_expert_parallel needs a mixture-of-experts model"):
        check_moe_parallel(None, 2, True)
    with pytest.raises(ValueError, match="moe_capacity_factor must be > 0"):
        EngineArgs(moe_capacity_factor=0)
    with pytest.raises(ValueError, match="moe_overflow_policy must be one of"):
        EngineArgs(moe_overflow_policy="nope")


def test_misshaped_expert_tensor_is_refused():
    layer = _layer(MoEConfig(E, K, INTER), {})
    with pytest.raises(ValueError, match=r"expert gate weight has shape \(8, 12\), expected \(16, 12\)"):
        layer.weight_loader(layer.w13_weight, torch.zeros(8, H), (0, "gate"))
    with pytest.raises(ValueError, match="expert 9 out of range"):
        layer.weight_loader(layer.w13_weight, torch.zeros(INTER, H), (9, "gate"))


# -- 2 ranks -------------------------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, port: int) -> None:
    from fleetlm.distributed.communication import tensor_model_parallel_all_reduce
    from fleetlm.distributed.parallel_state import (
        ParallelConfig,
        destroy_distributed,
        init_distributed,
    )

    torch.set_num_threads(1)
    init_distributed(ParallelConfig(2, 1), rank, torch.device("cpu"), init_method=f"tcp://127.0.0.1:{port}")
    try:
        g = torch.Generator().manual_seed(0)
        w, x, logits = _weights(g), torch.randn(13, H, generator=g), torch.randn(13, E, generator=g)
        expected = _reference(x, logits, w, K, True)
        layouts = [dict(expert_parallel=False), dict(expert_parallel=True, ep_dispatch="all_to_all"),
                   dict(expert_parallel=True, ep_dispatch="all_reduce")]
        for kw in layouts:
            layer = _layer(MoEConfig(E, K, INTER, **kw), w)
            if kw["expert_parallel"]:
                assert layer.num_local_experts == E // 2 and layer.first_expert == rank * E // 2
            out = layer(x, logits)
            if layer.output_is_partial:
                out = tensor_model_parallel_all_reduce(out)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=str(kw))
        for policy in ("drop", "reroute"):  # capacity under EP: the single-process routing and output
            layer = _layer(MoEConfig(E, K, INTER, expert_parallel=True, capacity_factor=0.5, overflow_policy=policy), w)
            out = layer(x, logits)
            stats = layer.stats.snapshot()
            assert stats.dropped + stats.rerouted > 0
            torch.testing.assert_close(out, _capacity_reference(x, logits, w, policy), rtol=1e-5, atol=1e-5)
    finally:
        destroy_distributed()


def _capacity_reference(x, logits, w, policy):
    from fleetlm.moe.routing import apply_capacity, topk_gate

    routing, probs = topk_gate(logits, K, True)
    r = apply_capacity(routing, probs, 0.5, policy)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, p in zip(r.ids[t].tolist(), r.weights[t].tolist()):
            if e >= 0:
                h = F.silu(x[t] @ w[e]["gate"].T) * (x[t] @ w[e]["up"].T)
                out[t] += p * (h @ w[e]["down"].T)
    return out


def test_tp_and_ep_layouts_match_one_process():
    torch.multiprocessing.spawn(_run, args=(_port(),), nprocs=2, join=True)


def _block(moe: MoEConfig, g: torch.Generator):
    """A Qwen2-MoE-style block (router, experts, shared expert and its gate) from full tensors."""
    from fleetlm.models.loader import ModelConfig
    from fleetlm.models.moe import SparseMoeBlock

    cfg = ModelConfig("Qwen2MoeForCausalLM", 16, H, 32, 1, 2, 2, 6, 1e-6, 1e4, 64, False, moe=moe)
    block = SparseMoeBlock(cfg, moe, torch.float32)
    w = _weights(g)
    for e, parts in w.items():
        for kind, t in parts.items():
            block.experts.weight_loader(block.experts.w2_weight if kind == "down" else block.experts.w13_weight,
                                        t, (e, kind))
    router, sgate = torch.randn(E, H, generator=g), torch.randn(1, H, generator=g)
    gate, up, down = (torch.randn(8, H, generator=g), torch.randn(8, H, generator=g), torch.randn(H, 8, generator=g))
    block.gate.weight_loader(block.gate.weight, router)
    block.shared_expert_gate.weight_loader(block.shared_expert_gate.weight, sgate)
    block.shared_expert.gate_up_proj.weight_loader(block.shared_expert.gate_up_proj.weight, gate, 0)
    block.shared_expert.gate_up_proj.weight_loader(block.shared_expert.gate_up_proj.weight, up, 1)
    block.shared_expert.down_proj.weight_loader(block.shared_expert.down_proj.weight, down)
    return block.requires_grad_(True)


def _grads(rank: int | None) -> dict:
    g = torch.Generator().manual_seed(3)
    block = _block(MoEConfig(E, K, INTER, norm_topk_prob=False, shared_expert_intermediate_size=8,
                             num_shared_experts=1, shared_expert_gate=True), g)
    x = torch.randn(2, 5, H, generator=g).requires_grad_(True)
    block(x).pow(2).sum().backward()
    return {"x": x.grad, "router": block.gate.weight.grad, "out": block(x).detach(),
            "w2_first": block.experts.w2_weight.grad[0]}


def _run_grads(rank: int, port: int, ref: dict) -> None:
    from fleetlm.distributed.parallel_state import (
        ParallelConfig,
        destroy_distributed,
        init_distributed,
    )

    torch.set_num_threads(1)
    init_distributed(ParallelConfig(2, 1), rank, torch.device("cpu"), init_method=f"tcp://127.0.0.1:{port}")
    try:
        got = _grads(rank)
        for name in ("x", "router", "out"):
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
        cols = INTER // 2  # expert 0's down projection: this rank's columns
        torch.testing.assert_close(got["w2_first"], ref["w2_first"][:, rank * cols : (rank + 1) * cols])
    finally:
        destroy_distributed()


def test_tp_training_gradients_match_one_process():
    """Training under TP: the block's input, router and expert-shard gradients equal the slices
    of the single-process ones (the expert shards' input gradients are summed over the group)."""
    torch.multiprocessing.spawn(_run_grads, args=(_port(), _grads(None)), nprocs=2, join=True)
