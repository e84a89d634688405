"""The MoE part of a Hugging Face ``config.json``: one parser for the engine and the planner.

Families and their spellings:

- Mixtral: ``num_local_experts``, ``num_experts_per_tok``, experts as wide as ``intermediate_size``,
  top-k weights always renormalised, no shared expert.
- Qwen2-MoE / Qwen3-MoE: ``num_experts`` (transformers 5 also writes ``num_local_experts``),
  ``moe_intermediate_size``, ``norm_topk_prob``, ``decoder_sparse_step`` and ``mlp_only_layers``
  (dense layers); Qwen2-MoE adds one shared expert of ``shared_expert_intermediate_size`` with a
  sigmoid gate.
- DeepSeek (planner only): ``n_routed_experts``, ``n_shared_experts``, ``first_k_dense_replace``.

Runtime choices (expert parallelism, capacity factor, overflow policy) ride along in the same
frozen object so every rank builds its layers from one value (``with_runtime``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

OVERFLOW_POLICIES = ("drop", "reroute")
EP_DISPATCH = ("all_to_all", "all_reduce")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool = True
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(gate(x)) scales the shared expert
    first_k_dense: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0
    # runtime (engine arguments), the same on every rank
    expert_parallel: bool = False
    capacity_factor: float | None = None
    overflow_policy: str = "reroute"
    ep_dispatch: str = "all_to_all"
    replica_slots: int = 0  # spare expert slots per EP rank for hot-expert copies
    rebalance_interval: int = 0  # forwards between replica rebalances (0: placement never changes)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` routes to experts (else it keeps a dense MLP)."""
        return (layer >= self.first_k_dense and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def num_dense_layers(self, num_layers: int) -> int:
        return sum(1 for i in range(num_layers) if not self.is_moe_layer(i))

    def with_runtime(self, *, expert_parallel: bool = False, capacity_factor: float | None = None,
                     overflow_policy: str = "reroute", ep_dispatch: str = "all_to_all", replica_slots: int = 0,
                     rebalance_interval: int = 0) -> MoEConfig:
        check_runtime(capacity_factor, overflow_policy, ep_dispatch, replica_slots, rebalance_interval)
        return dataclasses.replace(self, expert_parallel=expert_parallel, capacity_factor=capacity_factor,
                                   overflow_policy=overflow_policy, ep_dispatch=ep_dispatch,
                                   replica_slots=replica_slots, rebalance_interval=rebalance_interval)


def moe_config_from_hf(cfg: dict[str, Any]) -> MoEConfig | None:
    """The MoE fields of an HF config dict, or None for a dense model."""
    experts = int(cfg.get("num_local_experts") or cfg.get("n_routed_experts") or cfg.get("num_experts") or 0)
    if not experts:
        return None
    model_type = str(cfg.get("model_type", ""))
    width = int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0)
    shared_n = int(cfg.get("n_shared_experts") or 0)
    shared_width = int(cfg.get("shared_expert_intermediate_size") or shared_n * width)
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    if not 1 <= top_k <= experts:
        raise ValueError(f"num_experts_per_tok must be between 1 and the {experts} experts, got {top_k}")
    return MoEConfig(
        num_experts=experts, top_k=top_k, moe_intermediate_size=width,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", not model_type.startswith("qwen"))),
        num_shared_experts=shared_n or (1 if shared_width else 0),
        shared_expert_intermediate_size=shared_width,
        shared_expert_gate=bool(shared_width) and model_type == "qwen2_moe",
        first_k_dense=int(cfg.get("first_k_dense_replace") or 0),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef") or 0.0),
    )


def check_runtime(capacity_factor: float | None, overflow_policy: str, ep_dispatch: str = "all_to_all",
                  replica_slots: int = 0, rebalance_interval: int = 0) -> None:
    """The MoE engine arguments: ``ValueError`` naming the bad one."""
    if capacity_factor is not None and (isinstance(capacity_factor, bool) or not capacity_factor > 0):
        raise ValueError(f"moe_capacity_factor must be > 0, got {capacity_factor!r}")
    if overflow_policy not in OVERFLOW_POLICIES:
        raise ValueError(f"moe_overflow_policy must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow_policy!r}")
    if ep_dispatch not in EP_DISPATCH:
        raise ValueError(f"moe_ep_dispatch must be one of {', '.join(EP_DISPATCH)}, got {ep_dispatch!r}")
    for name, v in (("moe_replica_slots", replica_slots), ("moe_rebalance_interval", rebalance_interval)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")


def runtime_config(moe: MoEConfig | None, args) -> MoEConfig | None:
    """The model's MoE config with the engine's MoE arguments (``EngineArgs``) folded in, after
    checking that they fit the model and the layout; a dense model refuses every MoE argument."""
    runtime = {"capacity_factor": args.moe_capacity_factor, "overflow_policy": args.moe_overflow_policy,
               "ep_dispatch": args.moe_ep_dispatch, "replica_slots": args.moe_replica_slots,
               "rebalance_interval": args.moe_rebalance_interval}
    if moe is None:
        given = [f"moe_{k}" for k in ("capacity_factor", "replica_slots", "rebalance_interval") if runtime[k]]
        if given:
            raise ValueError(f"{', '.join(given)} apply to mixture-of-experts models; this model is dense")
        check_moe_parallel(None, args.tensor_parallel_size, args.enable_expert_parallel)
        return None
    moe = moe.with_runtime(expert_parallel=args.enable_expert_parallel, **runtime)
    check_moe_parallel(moe, args.tensor_parallel_size, args.enable_expert_parallel)
    return moe


def check_moe_parallel(moe: MoEConfig | None, tp: int, expert_parallel: bool) -> None:
    """``ValueError`` naming the numbers when a layout cannot split the experts."""
    if moe is None:
        if expert_parallel:
            raise ValueError("enable_expert_parallel needs a mixture-of-experts model; this model is dense")
        return
    if expert_parallel and moe.num_experts % tp:
        raise ValueError(f"expert parallel size {tp} (the tensor-parallel ranks) does not divide the model's "
                         f"{moe.num_experts} experts")
    if not expert_parallel and moe.moe_intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the experts' intermediate size "
                         f"({moe.moe_intermediate_size}); try enable_expert_parallel")
    if moe.replica_slots and not (expert_parallel and tp > 1 and moe.ep_dispatch == "all_to_all"):
        raise ValueError("moe_replica_slots needs enable_expert_parallel over 2+ tensor-parallel ranks with "
                         "moe_ep_dispatch all_to_all")
    if moe.rebalance_interval and not moe.replica_slots:
        raise ValueError("moe_rebalance_interval needs moe_replica_slots > 0 (there is nothing to rebalance)")
    if moe.shared_expert_intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the shared expert's intermediate size "
                         f"({moe.shared_expert_intermediate_size})")
