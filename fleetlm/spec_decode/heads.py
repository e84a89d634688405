"""EAGLE and Medusa draft heads: modules, the on-disk format, loaders and random heads.

Format (written down in docs/SPEC_DECODE.md; ``fleetlm train`` will write it): a directory with
``config.json`` and ``model.safetensors``.

- EAGLE, ``{"format": "fleetlm-eagle", "version": 1, "hidden_size", "vocab_size", "num_heads",
  "num_kv_heads", "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "fc_bias"}``;
  tensors ``fc.weight [H, 2H]`` (``fc.bias [H]`` when ``fc_bias``) and one Llama decoder layer
  under ``layer.`` with Hugging Face names (``layer.self_attn.q_proj.weight``, ...,
  ``layer.mlp.down_proj.weight``, ``layer.input_layernorm.weight``, ...).
- Medusa, ``{"format": "fleetlm-medusa", "version": 1, "hidden_size", "vocab_size",
  "num_heads", "num_layers", "has_lm_head"}``; tensors ``heads.{j}.blocks.{l}.weight [H, H]``,
  ``heads.{j}.blocks.{l}.bias [H]`` and, when ``has_lm_head``, ``heads.{j}.lm_head.weight [V, H]``
  (else head ``j`` uses the target's LM head).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from fleetlm.layers.rotary import RotaryEmbedding
from fleetlm.models.llama import _STACKED, LlamaDecoderLayer
from fleetlm.models.loader import ModelConfig

EAGLE_FORMAT, MEDUSA_FORMAT = "fleetlm-eagle", "fleetlm-medusa"


def read_head(path: str | Path, fmt: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f"speculative_config.model: {path} is not a {fmt} head directory "
                         f"(config.json and model.safetensors expected)")
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("format") != fmt or cfg.get("version") != 1:
        raise ValueError(f"speculative_config.model: {path} holds format {cfg.get('format')!r} "
                         f"version {cfg.get('version')!r}, expected {fmt!r} version 1")
    return cfg, load_file(str(path / "model.safetensors"))


def write_head(path: str | Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def check_dims(cfg: dict, target: ModelConfig, keys: tuple[str, ...]) -> None:
    want = {"hidden_size": target.hidden_size, "vocab_size": target.vocab_size, "num_heads": target.num_heads,
            "num_kv_heads": target.num_kv_heads, "head_dim": target.head_dim}
    for k in keys:
        if cfg.get(k) != want[k]:
            raise ValueError(f"speculative_config.model: head {k} is {cfg.get(k)!r}, the target's is {want[k]}")


def target_signature(model: nn.Module) -> list[float]:
    """A few of the target's own numbers (embedding rows, final norm) that a trained head records
    (``target_signature`` in its config.json) so that a proposer refuses it on another model."""
    v = model.config.vocab_size
    emb, norm = model.model.embed_tokens.weight, model.model.norm.weight
    vals = torch.cat([emb[r, :4] for r in (1, v // 3, 2 * v // 3)] + [norm[:4]])
    return [round(float(x), 6) for x in vals.detach().float().cpu()]


def check_target(cfg: dict, model: nn.Module, path: str | Path) -> None:
    """Refuse a head trained for another target (heads without a signature are not checked).
    The tolerance covers the target's serving dtype (bf16 rounding)."""
    sig = cfg.get("target_signature")
    if sig is None:
        return
    mine = torch.tensor(target_signature(model))
    if len(sig) != len(mine) or not torch.allclose(torch.tensor(sig), mine, rtol=2e-2, atol=1e-3):
        raise ValueError(f"speculative_config.model: the head at {path} was trained for target "
                         f"{cfg.get('target')!r}, and this model is a different one (its weights differ); "
                         f"train a head for it with `fleetlm train draft-head --target ...`")


class EagleHead(nn.Module):
    """fc([feature_p, embed(token_{p+1})]) -> one decoder layer at position p; its output
    (layer output + residual, then the target's final norm and LM head) predicts token p+2, and
    the layer output + residual is the feature fed back for the next draft."""

    def __init__(self, cfg: dict, target: ModelConfig, dtype: torch.dtype, max_positions: int, layer_idx: int) -> None:
        super().__init__()
        lcfg = replace(target, intermediate_size=cfg["intermediate_size"], rms_norm_eps=cfg["rms_norm_eps"],
                       rope_theta=cfg["rope_theta"], attention_bias=False,
                       quantization=None)  # the head is plain (the target may be kept quantized)
        h = target.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=bool(cfg.get("fc_bias")), dtype=dtype)
        rope = RotaryEmbedding(lcfg.head_dim, max_positions, lcfg.rope_theta, lcfg.rope_scaling, dtype)
        self.layer = LlamaDecoderLayer(lcfg, layer_idx, rope, dtype)

    def forward(self, feature: torch.Tensor, token_embed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.fc(torch.cat([feature, token_embed], dim=-1))
        out, residual = self.layer(positions, x, None)
        return out + residual

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        seen = set()
        for name, t in tensors.items():
            pname, shard = name, None
            for hf, ours, s in _STACKED:
                if f".{hf}." in name:
                    pname, shard = name.replace(f".{hf}.", f".{ours}."), s
            if pname not in params:
                raise ValueError(f"speculative_config.model: unexpected tensor {name!r} in the EAGLE head")
            mod = self.get_submodule(pname.rsplit(".", 1)[0])
            if hasattr(mod, "weight_loader"):
                mod.weight_loader(params[pname], t, shard)
            elif tuple(t.shape) != tuple(params[pname].shape):
                raise ValueError(f"speculative_config.model: {name} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(params[pname].shape)}")
            else:
                params[pname].copy_(t)
            seen.add(pname)
        missing = sorted(set(params) - seen)
        if missing:
            raise ValueError(f"speculative_config.model: EAGLE head lacks {', '.join(missing[:4])}")


class MedusaHeads(nn.Module):
    """Head ``j`` (0-based): ``num_layers`` residual blocks ``x + SiLU(W x + b)``, then its LM
    head (or the target's); applied to the target's final hidden state at position p it
    predicts token ``p + 2 + j``."""

    def __init__(self, cfg: dict, dtype: torch.dtype) -> None:
        super().__init__()
        h, v = cfg["hidden_size"], cfg["vocab_size"]
        self.heads = nn.ModuleList()
        for _ in range(cfg["num_heads"]):
            head = nn.Module()
            head.blocks = nn.ModuleList(nn.Linear(h, h, dtype=dtype) for _ in range(cfg["num_layers"]))
            if cfg.get("has_lm_head"):
                head.lm_head = nn.Linear(h, v, bias=False, dtype=dtype)
            self.heads.append(head)

    def hidden(self, j: int, x: torch.Tensor) -> torch.Tensor:
        for block in self.heads[j].blocks:
            x = x + nn.functional.silu(block(x))
        return x

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        result = self.load_state_dict({k: v for k, v in tensors.items()}, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"speculative_config.model: Medusa heads: missing {result.missing_keys[:4]}, "
                             f"unexpected {result.unexpected_keys[:4]}")


def random_eagle_head(path: str | Path, target: ModelConfig, seed: int = 0, std: float = 0.02) -> Path:
    """A random EAGLE head in the format above (tests, benchmarks until trained heads exist)."""
    g = torch.Generator().manual_seed(seed)
    h, d, i = target.hidden_size, target.head_dim, target.intermediate_size

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    t = {"fc.weight": rnd(h, 2 * h), "layer.input_layernorm.weight": torch.ones(h),
         "layer.post_attention_layernorm.weight": torch.ones(h),
         "layer.self_attn.q_proj.weight": rnd(target.num_heads * d, h),
         "layer.self_attn.k_proj.weight": rnd(target.num_kv_heads * d, h),
         "layer.self_attn.v_proj.weight": rnd(target.num_kv_heads * d, h),
         "layer.self_attn.o_proj.weight": rnd(h, target.num_heads * d),
         "layer.mlp.gate_proj.weight": rnd(i, h), "layer.mlp.up_proj.weight": rnd(i, h),
         "layer.mlp.down_proj.weight": rnd(h, i)}
    cfg = {"format": EAGLE_FORMAT, "version": 1, "hidden_size": h, "vocab_size": target.vocab_size,
           "num_heads": target.num_heads, "num_kv_heads": target.num_kv_heads, "head_dim": d,
           "intermediate_size": i, "rms_norm_eps": target.rms_norm_eps, "rope_theta": target.rope_theta,
           "fc_bias": False}
    return write_head(path, cfg, t)


def random_medusa_heads(path: str | Path, target: ModelConfig, num_heads: int = 3, num_layers: int = 1,
                        seed: int = 0, std: float = 0.02, has_lm_head: bool = False) -> Path:
    g = torch.Generator().manual_seed(seed)
    h = target.hidden_size
    t = {}
    for j in range(num_heads):
        for layer in range(num_layers):
            t[f"heads.{j}.blocks.{layer}.weight"] = torch.randn(h, h, generator=g) * std
            t[f"heads.{j}.blocks.{layer}.bias"] = torch.zeros(h)
        if has_lm_head:
            t[f"heads.{j}.lm_head.weight"] = torch.randn(target.vocab_size, h, generator=g) * std
    cfg = {"format": MEDUSA_FORMAT, "version": 1, "hidden_size": h, "vocab_size": target.vocab_size,
           "num_heads": num_heads, "num_layers": num_layers, "has_lm_head": has_lm_head}
    return write_head(path, cfg, t)
