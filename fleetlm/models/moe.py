"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE on the Llama skeleton.

The attention, norms, embedding, pipeline stages and the serving/training forward are those of
``models/llama.py``; the MLP of an MoE block is a router (``gate``, replicated), the routed
experts (``layers/moe.py: FusedMoE``) and, for Qwen2-MoE, a shared expert scaled by
``sigmoid(shared_expert_gate(x))``. Qwen3-MoE adds RMSNorm on each q and k head before RoPE.
Dense blocks of a partly sparse model (``mlp_only_layers``, ``decoder_sparse_step``) keep a
Llama MLP. One all-reduce per block sums the TP (or EP) partial outputs of experts and shared
expert together.

Checkpoint names: Mixtral ``block_sparse_moe.experts.{e}.w1|w3|w2`` (gate, up, down), Qwen
``mlp.experts.{e}.gate_proj|up_proj|down_proj``; ``load_weights`` stays strict (a missing or
misshaped expert tensor is an error naming it).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fleetlm.distributed.communication import (
    copy_to_tensor_model_parallel_region,
    tensor_model_parallel_all_reduce,
)
from fleetlm.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from fleetlm.layers.moe import FusedMoE
from fleetlm.layers.norm import RMSNorm
from fleetlm.layers.rotary import RotaryEmbedding
from fleetlm.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    make_lm_head,
)
from fleetlm.models.loader import ModelConfig
from fleetlm.moe.config import MoEConfig

_EXPERT = re.compile(r"^(model\.layers\.\d+\.(?:mlp|block_sparse_moe))\.experts\.(\d+)\.(\w+)\.weight$")
_KIND = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, dtype: torch.dtype, prefix: str = "") -> None:
        super().__init__()
        self.gate = ReplicatedLinear(cfg.hidden_size, moe.num_experts, dtype=dtype)
        # a quantization may keep the experts in its own format (GGUF MXFP4: quantization/mxfp4.py)
        method = None if cfg.quantization is None else cfg.quantization.moe_method(f"{prefix}.experts")
        self.experts = FusedMoE(moe, cfg.hidden_size, dtype, method=method)
        width = moe.shared_expert_intermediate_size
        self.shared_expert = _SharedExpert(cfg.hidden_size, width, dtype) if width else None
        self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1, dtype=dtype) if moe.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        if self.experts.output_is_partial:
            # training under TP: each rank's expert shards compute a part of the output from x and
            # from the routing weights, so both gradients are summed over the group
            x_experts, logits = copy_to_tensor_model_parallel_region(x), copy_to_tensor_model_parallel_region(logits)
        else:
            x_experts = x
        out = self.experts(x_experts, logits)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # a partial sum under TP (its input gradient is summed inside)
            if self.shared_expert_gate is not None:
                scale = copy_to_tensor_model_parallel_region(torch.sigmoid(self.shared_expert_gate(x)))
                shared = scale * shared
            if not self.experts.output_is_partial:  # complete expert output: reduce the shared part alone
                shared = tensor_model_parallel_all_reduce(shared)
            out = out + shared
        if self.experts.output_is_partial:
            out = tensor_model_parallel_all_reduce(out)
        return out.reshape(shape)


class _SharedExpert(LlamaMLP):
    """A dense gated MLP whose down projection leaves the sum to the block's all-reduce."""

    def __init__(self, hidden: int, width: int, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        from fleetlm.layers.activation import SiluAndMul

        self.gate_up_proj = MergedColumnParallelLinear(hidden, [width] * 2, dtype=dtype)
        self.down_proj = RowParallelLinear(width, hidden, dtype=dtype, reduce_results=False)
        self.act_fn = SiluAndMul(dtype)


class QKNormAttention(LlamaAttention):
    """Qwen3: RMSNorm over each q and k head (``q_norm``, ``k_norm``) before RoPE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__(cfg, layer_idx, rope, dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h, hkv, d = self.h, self.hkv, self.d
        qkv = self.qkv_proj(x)
        heads = qkv.view(*qkv.shape[:-1], -1, d)
        q = self.q_norm(heads[..., :h, :].reshape(-1, d)).view(*heads.shape[:-2], h, d)
        k = self.k_norm(heads[..., h : h + hkv, :].reshape(-1, d)).view(*heads.shape[:-2], hkv, d)
        qkv = torch.cat((q, k, heads[..., h + hkv :, :]), dim=-2).flatten(-2)
        qkv = self.rotary_emb(positions, qkv, h + hkv)
        out = self.attn(qkv[..., :h, :], qkv[..., h : h + hkv, :], qkv[..., h + hkv :, :])
        return self.o_proj(out.reshape(*out.shape[:-2], h * d))


class MoEDecoderLayer(LlamaDecoderLayer):
    mlp_name = "mlp"
    qk_norm = False

    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        attn = QKNormAttention if self.qk_norm else LlamaAttention
        self.self_attn = attn(cfg, layer_idx, rope, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        moe = cfg.moe
        if moe.is_moe_layer(layer_idx):
            mlp = SparseMoeBlock(cfg, moe, dtype, f"model.layers.{layer_idx}.{self.mlp_name}")
        else:  # the prefix finds a kept GGUF layer's method (its checkpoint names are mlp.*)
            mlp = LlamaMLP(cfg, dtype, f"model.layers.{layer_idx}.mlp")
        setattr(self, self.mlp_name, mlp)


class MixtralDecoderLayer(MoEDecoderLayer):
    mlp_name = "block_sparse_moe"

    @property
    def mlp(self) -> nn.Module:  # Llama's name, which LlamaDecoderLayer.forward uses
        return self.block_sparse_moe


class Qwen3MoeDecoderLayer(MoEDecoderLayer):
    qk_norm = True


class MoEModel(LlamaModel):
    layer_cls: type[MoEDecoderLayer] = MoEDecoderLayer


class MoEForCausalLM(LlamaForCausalLM):
    """Base of the MoE families; subclasses pick the decoder layer."""

    layer_cls: type[MoEDecoderLayer] = MoEDecoderLayer

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int, layers: range | None = None) -> None:
        if cfg.moe is None:
            raise ValueError(f"{cfg.architecture}: config.json has no experts (num_local_experts / num_experts)")
        nn.Module.__init__(self)
        self.config = cfg
        model_cls = type(f"{type(self).__name__}Model", (MoEModel,), {"layer_cls": self.layer_cls})
        self.model = model_cls(cfg, dtype, max_positions, layers if layers is not None else range(cfg.num_layers))
        self.lm_head = make_lm_head(cfg, dtype, self.model)

    def moe_layers(self) -> dict[int, FusedMoE]:
        """This stage's routed-expert layers by block index."""
        return {i: self.layers[i].mlp.experts for i in self.layer_range
                if isinstance(self.layers[i].mlp, SparseMoeBlock)}

    def _targets(self, name: str) -> list[tuple[str, str | int | tuple | None]]:
        m = _EXPERT.match(name)
        if m is None or m.group(3) not in _KIND:
            return super()._targets(name)
        layer = int(name.split(".")[2])
        if layer >= self.config.num_layers:
            raise ValueError(f"unexpected weight {name!r}: the model has {self.config.num_layers} layers")
        if layer not in self.layer_range:
            return []
        expert, kind = int(m.group(2)), _KIND[m.group(3)]
        fused = self.get_submodule(f"{m.group(1)}.experts")
        if not fused.is_local(expert) and 0 <= expert < fused.num_experts:
            return []
        return [(f"{m.group(1)}.experts.{'w2' if kind == 'down' else 'w13'}_weight", (expert, kind))]

    def _expected(self) -> set[tuple[str, str | int | tuple | None]]:
        out = {(n, s) for n, s in super()._expected() if not n.endswith(("w13_weight", "w2_weight"))}
        for name, module in self.named_modules():
            if isinstance(module, FusedMoE):
                for e in range(module.first_expert, module.first_expert + module.num_local_experts):
                    out |= {(f"{name}.w13_weight", (e, "gate")), (f"{name}.w13_weight", (e, "up")),
                            (f"{name}.w2_weight", (e, "down"))}
        return out


class MixtralForCausalLM(MoEForCausalLM):
    layer_cls = MixtralDecoderLayer


class Qwen2MoeForCausalLM(MoEForCausalLM):
    layer_cls = MoEDecoderLayer


class Qwen3MoeForCausalLM(MoEForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer
