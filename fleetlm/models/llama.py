"""Llama-family decoder (Llama 2/3, Mistral without sliding window, Qwen2 with attention bias).

One model file for serving and training, built from tensor-parallel layers (``layers/``):

- serving: ``forward(input_ids [T], positions [T])`` over a flat token axis, attention reading the
  paged-KV metadata from the forward context;
- training / plain use: ``forward(input_ids [B, T], positions [B, T])`` with no forward context:
  causal SDPA, parameters that may require grad (``requires_grad_()``), logits via ``lm_head``.

Pipeline parallelism: this rank builds only its stage's layers (others are ``PPMissingLayer``),
the embedding on the first stage and the final norm and LM head on the last. A stage that is
not the first takes ``IntermediateTensors`` (hidden states and residual) instead of ids; one
that is not the last returns them.

``load_weights`` takes Hugging Face names and full tensors; each layer's ``weight_loader`` keeps
this rank's slice. It is strict: a missing, unexpected or misshaped tensor is an error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fleetlm.distributed.parallel_state import parallel_state
from fleetlm.layers.activation import SiluAndMul
from fleetlm.layers.attention import Attention
from fleetlm.layers.linear import (
    LinearMethod,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    process_weights_after_loading,
)
from fleetlm.layers.norm import RMSNorm
from fleetlm.layers.rotary import RotaryEmbedding
from fleetlm.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from fleetlm.models.loader import ModelConfig


@dataclass
class IntermediateTensors:
    """What one pipeline stage hands to the next."""

    hidden: torch.Tensor
    residual: torch.Tensor


class PPMissingLayer(nn.Identity):
    """Stands where a module of another pipeline stage would be."""


def _method(cfg: ModelConfig, prefix: str) -> LinearMethod | None:
    """The quantization's linear method for layer ``prefix`` (None: unquantized)."""
    return None if cfg.quantization is None else cfg.quantization.linear_method(prefix)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        p = f"model.layers.{layer_idx}.self_attn"
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.attention_bias, dtype=dtype,
                                          linear_method=_method(cfg, f"{p}.qkv_proj"))
        self.h, self.hkv, self.d = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, dtype=dtype,
                                        linear_method=_method(cfg, f"{p}.o_proj"))
        self.rotary_emb = rope
        self.attn = Attention(layer_idx)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.rotary_emb(positions, self.qkv_proj(x), self.h + self.hkv)
        h, hkv = self.h, self.hkv
        out = self.attn(qkv[..., :h, :], qkv[..., h : h + hkv, :], qkv[..., h + hkv :, :])
        return self.o_proj(out.reshape(*out.shape[:-2], h * self.d))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, dtype=dtype,
                                                       linear_method=_method(cfg, f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype,
                                           linear_method=_method(cfg, f"{prefix}.down_proj"))
        self.act_fn = SiluAndMul(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, layer_idx, rope, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype, f"model.layers.{layer_idx}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block output and the residual stream before it (their sum is the
        hidden state a Hugging Face decoder layer returns)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    layer_cls: type[nn.Module] = LlamaDecoderLayer  # MoE families swap in their decoder layer

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int, layers: range) -> None:
        super().__init__()
        st = parallel_state()
        self.layer_range = layers
        rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype)
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
                             if st.is_first_stage else PPMissingLayer())
        self.layers = nn.ModuleList(
            self.layer_cls(cfg, i, rope, dtype) if i in layers else PPMissingLayer()
            for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype) if st.is_last_stage else PPMissingLayer()

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        if intermediate is None:
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = intermediate.hidden, intermediate.residual
        for i in self.layer_range:
            x, residual = self.layers[i](positions, x, residual)
        if not parallel_state().is_last_stage:
            return IntermediateTensors(x, residual)
        x, _ = self.norm(x, residual)
        return x


# Hugging Face name fragment -> (our merged parameter, shard id)
_STACKED = (("q_proj", "qkv_proj", "q"), ("k_proj", "qkv_proj", "k"), ("v_proj", "qkv_proj", "v"),
            ("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1))
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def make_lm_head(cfg: ModelConfig, dtype: torch.dtype, model: nn.Module) -> nn.Module:
    """The LM head of the last pipeline stage (a placeholder elsewhere): tied to ``model``'s
    embedding when the config says so, computed the way the quantization says (its
    ``lm_head()``: an int8 copy, or a GGUF Q8_0 / Q6_K output matrix as shipped)."""
    st = parallel_state()
    if not st.is_last_stage:
        return PPMissingLayer()
    tie = model.embed_tokens if cfg.tie_word_embeddings and st.is_first_stage else None
    head_cls = ParallelLMHead
    if cfg.quantization is not None and cfg.quantization.lm_head() is not None:
        from fleetlm.quantization.lm_head import lm_head_class

        head_cls = lm_head_class(cfg.quantization.lm_head())
    return head_cls(cfg.vocab_size, cfg.hidden_size, dtype=dtype, tie_to=tie)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int, layers: range | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, dtype, max_positions, layers if layers is not None else range(cfg.num_layers))
        self.lm_head = make_lm_head(cfg, dtype, self.model)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def layer_range(self) -> range:
        """The layers this pipeline stage runs."""
        return self.model.layer_range

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor | None = None,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """Final hidden states (or this stage's ``IntermediateTensors``). ``positions`` default to
        ``0 .. T-1`` along the last axis (plain, unpaged use)."""
        if positions is None:
            t = (input_ids if input_ids is not None else intermediate.hidden[..., 0]).shape[-1]
            positions = torch.arange(t, device=next(self.parameters()).device)
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """fp32 logits for the given rows on TP rank 0 of the last stage (None on other TP ranks)."""
        return self.lm_head.compute_logits(hidden)

    # -- weights ----------------------------------------------------------------------------------
    def _targets(self, name: str) -> list[tuple[str, str | int | None]]:
        """Our (parameter, shard id) pairs that checkpoint tensor ``name`` fills on this rank;
        empty when it belongs to another pipeline stage."""
        cfg, st = self.config, parallel_state()
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= cfg.num_layers:
            raise ValueError(f"unexpected weight {name!r}: the model has {cfg.num_layers} layers")
        if m and int(m.group(1)) not in self.model.layer_range:
            return []
        if name.startswith("lm_head.") and not st.is_last_stage:
            return []  # lm_head.weight, or a quantized head's lm_head.qweight / lm_head.scales
        if name == "lm_head.weight":
            return [] if cfg.tie_word_embeddings else [(name, None)]
        if name == "model.embed_tokens.weight":
            out = [(name, None)] if st.is_first_stage else []
            # a tied head on a stage without the embedding fills its own weight from it (a head kept
            # as a GGUF ships, with no float weight, takes lm_head.qweight / .scales instead)
            if cfg.tie_word_embeddings and st.is_last_stage and not st.is_first_stage \
                    and isinstance(getattr(self.lm_head, "weight", None), nn.Parameter):
                out.append(("lm_head.weight", None))
            return out
        if name.startswith("model.norm.") and not st.is_last_stage:
            return []
        for hf, ours, shard in _STACKED:
            if f".{hf}." in name:
                return [(name.replace(f".{hf}.", f".{ours}."), shard)]
        return [(name, None)]

    def _expected(self) -> set[tuple[str, str | int | None]]:
        out: set[tuple[str, str | int | None]] = set()
        for name, _ in self.named_parameters():
            if ".qkv_proj." in name:
                out |= {(name, s) for s in ("q", "k", "v")}
            elif ".gate_up_proj." in name:
                out |= {(name, 0), (name, 1)}
            else:
                out.add((name, None))
        return out

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load this rank's slice of every tensor; strict about names and shapes."""
        params = dict(self.named_parameters(remove_duplicate=False))
        expected, seen = self._expected(), set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            for pname, shard in self._targets(name):
                if pname not in params:
                    raise ValueError(f"unexpected weight {name!r} for {self.config.architecture}")
                module = self.get_submodule(pname.rsplit(".", 1)[0])
                try:
                    module.weight_loader(params[pname], tensor, shard)
                except ValueError as e:
                    raise ValueError(f"weight {name!r}: {e}") from None
                seen.add((pname, shard))
        missing = sorted(str(p if s is None else f"{p}[{s}]") for p, s in expected - seen)
        if missing:
            more = " ..." if len(missing) > 5 else ""
            raise ValueError(f"weights missing from the checkpoint: {', '.join(missing[:5])}{more}")
        process_weights_after_loading(self)  # quantized methods quantize or repack here

