"""Llama-family decoder (Llama 2/3, Mistral without sliding window, Qwen2 with attention bias).

Plain ``nn.Module``s over a flat token axis: ``forward(input_ids [T], positions [T])`` returns
hidden states [T, hidden]; attention reads the paged-KV metadata from the forward context.
q/k/v and gate/up projections are fused into one matmul each; ``load_weights`` takes Hugging
Face parameter names and fills the fused shards.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.layers.attention import Attention
from fleetlm.layers.norm import RMSNorm
from fleetlm.layers.rotary import RotaryEmbedding
from fleetlm.models.loader import ModelConfig


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (self.h + 2 * self.hkv) * self.d
        self.qkv_weight = _param(qkv_out, cfg.hidden_size, dtype=dtype)
        self.qkv_bias = _param(qkv_out, dtype=dtype) if cfg.attention_bias else None
        self.o_weight = _param(cfg.hidden_size, self.h * self.d, dtype=dtype)
        self.rope = rope
        self.attn = Attention(layer_idx)

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(t, self.h + 2 * self.hkv, self.d)
        qk = self.rope(cos_sin, qkv[:, : self.h + self.hkv])
        q, k = qk[:, : self.h], qk[:, self.h :]
        v = qkv[:, self.h + self.hkv :]
        out = self.attn(q, k, v)
        return F.linear(out.reshape(t, self.h * self.d), self.o_weight)

    def forward_fused(self, ops, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        ops.rope_(qkv, self.h + self.hkv, self.d, self.rope.cos, self.rope.sin_signed, positions)
        qkv = qkv.view(t, self.h + 2 * self.hkv, self.d)
        out = self.attn(qkv[:, : self.h], qkv[:, self.h : self.h + self.hkv], qkv[:, self.h + self.hkv :])
        return F.linear(out.reshape(t, self.h * self.d), self.o_weight)

    def shards(self) -> dict[str, tuple[nn.Parameter, int, int]]:
        h, kv = self.h * self.d, self.hkv * self.d
        out = {}
        for part, start, size in (("q_proj", 0, h), ("k_proj", h, kv), ("v_proj", h + kv, kv)):
            out[f"self_attn.{part}.weight"] = (self.qkv_weight, start, size)
            if self.qkv_bias is not None:
                out[f"self_attn.{part}.bias"] = (self.qkv_bias, start, size)
        out["self_attn.o_proj.weight"] = (self.o_weight, 0, self.o_weight.shape[0])
        return out


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_weight = _param(2 * self.inter, cfg.hidden_size, dtype=dtype)
        self.down_weight = _param(cfg.hidden_size, self.inter, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, self.gate_up_weight)
        return F.linear(F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :], self.down_weight)

    def forward_fused(self, ops, x: torch.Tensor) -> torch.Tensor:
        return F.linear(ops.silu_and_mul(F.linear(x, self.gate_up_weight)), self.down_weight)

    def shards(self) -> dict[str, tuple[nn.Parameter, int, int]]:
        i = self.inter
        return {
            "mlp.gate_proj.weight": (self.gate_up_weight, 0, i),
            "mlp.up_proj.weight": (self.gate_up_weight, i, i),
            "mlp.down_proj.weight": (self.down_weight, 0, self.down_weight.shape[0]),
        }


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, layer_idx, rope, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype)

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(cos_sin, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype)
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.rope = rope
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, rope, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.ops = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed_tokens)
        if self.ops is not None:
            return self._forward_fused(positions, x)
        cos_sin = self.rope.lookup(positions)
        for layer in self.layers:
            x = layer(cos_sin, x)
        return self.norm(x)

    def use_fused_ops(self, ops) -> None:
        """Run with the compiled fused ops (bf16/fp16 on CPU). fp32 keeps the op-for-op
        reference path so greedy outputs stay token-identical to transformers."""
        self.ops = ops

    def _forward_fused(self, positions: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Same maths, residual stream kept apart: each add_rms_norm_ adds the block output to
        the residual and normalizes the sum for the next block, in one pass."""
        ops, eps = self.ops, self.config.rms_norm_eps
        h = residual.clone()
        ops.add_rms_norm_(h, None, self.layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(self.layers):
            h = layer.self_attn.forward_fused(ops, positions, h)
            ops.add_rms_norm_(h, residual, layer.post_attention_layernorm.weight, eps)
            h = layer.mlp.forward_fused(ops, h)
            nxt = self.layers[i + 1].input_layernorm.weight if i + 1 < len(self.layers) else self.norm.weight
            ops.add_rms_norm_(h, residual, nxt, eps)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()

    def _targets(self) -> dict[str, tuple[nn.Parameter, int, int]]:
        out: dict[str, tuple[nn.Parameter, int, int]] = {
            "model.embed_tokens.weight": (self.embed_tokens, 0, self.config.vocab_size),
            "model.norm.weight": (self.norm.weight, 0, self.config.hidden_size),
        }
        if not self.config.tie_word_embeddings:
            out["lm_head.weight"] = (self.lm_head, 0, self.config.vocab_size)
        for i, layer in enumerate(self.layers):
            pre = f"model.layers.{i}."
            local = {**layer.self_attn.shards(), **layer.mlp.shards()}
            local["input_layernorm.weight"] = (layer.input_layernorm.weight, 0, self.config.hidden_size)
            local["post_attention_layernorm.weight"] = (layer.post_attention_layernorm.weight, 0, self.config.hidden_size)
            out.update({pre + k: v for k, v in local.items()})
        return out

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy every expected tensor into place; a missing, unexpected or misshaped one is an error."""
        targets = self._targets()
        seen: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name not in targets:
                raise ValueError(f"unexpected weight {name!r} for {self.config.architecture}")
            param, start, size = targets[name]
            dst = param.narrow(0, start, size)
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            seen.add(name)
        missing = sorted(set(targets) - seen)
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
