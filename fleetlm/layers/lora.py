"""LoRA adapters on the model's (fused) linear layers, saved and loaded in the PEFT layout.

A Hugging Face target (``q_proj``, ``gate_proj``, ...) is a row range of one of our layers
(``qkv_proj`` rows of q, ``gate_up_proj`` rows of gate, ...). ``LoRADelta`` holds one ``A``
[r, in] and ``B`` [rows, r] per target of its layer and adds ``scale * B A x`` to those output
rows (``scale = alpha / r``, PEFT's default), through a forward hook, so the layer and its
parameter names are unchanged. ``A`` starts as PEFT's (Kaiming-uniform), ``B`` at zero: a new
adapter leaves the model's outputs exactly as they were.

Adapters are for one tensor-parallel rank (tp = 1): a column-parallel layer's ``A`` would need
its gradient summed over the TP group.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.distributed.parallel_state import parallel_state

# Hugging Face target -> (our module, relative to a decoder layer; shard in the fused rows)
WHERE: dict[str, tuple[str, str | int | None]] = {
    "q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"), "o_proj": ("self_attn.o_proj", None),
    "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", None),
}
TARGETS = tuple(WHERE)


def _row_range(layer: nn.Module, shard: str | int | None) -> tuple[int, int]:
    """(first row, rows) of ``shard`` in ``layer``'s output."""
    if shard is None:
        return 0, layer.out_per_rank
    if shard in ("q", "k", "v"):
        q, kv = layer.num_heads * layer.head_dim, layer.num_kv_heads * layer.head_dim
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard]
    size = layer.output_sizes[int(shard)]
    return sum(layer.output_sizes[: int(shard)]), size


class LoRADelta(nn.Module):
    def __init__(self, layer: nn.Module, targets: dict[str, str | int | None], r: int, alpha: float,
                 dropout: float) -> None:
        super().__init__()
        rows_out, cols_in = layer.out_per_rank, layer.in_per_rank  # a quantized base keeps no float weight
        self.out_features, self.scale, self.dropout = rows_out, alpha / r, dropout
        self.ranges = {t: _row_range(layer, s) for t, s in targets.items()}
        self.A = nn.ParameterDict({t: nn.Parameter(torch.empty(r, cols_in)) for t in targets})
        self.B = nn.ParameterDict({t: nn.Parameter(torch.zeros(n, r)) for t, (_, n) in self.ranges.items()})
        for a in self.A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.dropout, self.training) if self.dropout else x
        pieces, pos = [], 0
        for t, (start, n) in sorted(self.ranges.items(), key=lambda kv: kv[1][0]):
            if start > pos:
                pieces.append(x.new_zeros(*x.shape[:-1], start - pos))
            pieces.append(F.linear(F.linear(x, self.A[t].to(x.dtype)), self.B[t].to(x.dtype)) * self.scale)
            pos = start + n
        if pos < self.out_features:
            pieces.append(x.new_zeros(*x.shape[:-1], self.out_features - pos))
        return torch.cat(pieces, dim=-1)


def _add_delta(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + module.lora(args[0])


def add_lora(model: nn.Module, sec: Any) -> list[str]:
    """Freeze ``model`` and attach adapters (``sec``: r, alpha, dropout, target_modules) to every
    decoder layer this rank holds; returns the names of the new parameters."""
    if parallel_state().tp_size > 1:
        raise ValueError("LoRA adapters are supported at tensor_parallel_size 1 only")
    bad = sorted(set(sec.target_modules) - set(TARGETS))
    if bad:
        raise ValueError(f"LoRA target_modules {', '.join(bad)} are not known; known: {', '.join(TARGETS)}")
    model.requires_grad_(False)
    by_module: dict[str, dict[str, str | int | None]] = {}
    for t in sec.target_modules:
        path, shard = WHERE[t]
        by_module.setdefault(path, {})[t] = shard
    for i in model.layer_range:
        for path, targets in by_module.items():
            layer = model.layers[i].get_submodule(path)
            layer.lora = LoRADelta(layer, targets, sec.r, sec.alpha, sec.dropout)
            layer.register_forward_hook(_add_delta)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _peft_key(name: str) -> str:
    """``model.layers.3.self_attn.qkv_proj.lora.A.q_proj`` -> PEFT's
    ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``."""
    head, _, rest = name.partition(".lora.")
    which, target = rest.split(".")
    parent = head.rsplit(".", 1)[0]
    return f"base_model.model.{parent}.{target}.lora_{which}.weight"


def save_peft_adapter(sd: dict[str, torch.Tensor], sec: Any, out: Path, base: str) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {_peft_key(k): v.detach().float().contiguous() for k, v in sd.items() if ".lora." in k}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": sec.r, "lora_alpha": sec.alpha,
           "lora_dropout": sec.dropout, "target_modules": sorted(sec.target_modules), "bias": "none",
           "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base,
           "use_rslora": False, "modules_to_save": None}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=1))


def load_peft_adapter(model: nn.Module, path: str | Path) -> None:
    """Attach and fill the adapter at ``path`` (PEFT layout). An adapter for another base model
    (a tensor whose shape or layer does not fit this one) is a ``ValueError`` naming it."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path} is not a LoRA adapter (peft_type {cfg.get('peft_type')!r})")
    targets = cfg["target_modules"]
    add_lora(model, SimpleNamespace(r=cfg["r"], alpha=cfg["lora_alpha"], dropout=0.0,
                                    target_modules=targets if isinstance(targets, list) else [targets]))
    ours = {_peft_key(n): p for n, p in model.named_parameters() if ".lora." in n}
    theirs = load_file(str(path / "adapter_model.safetensors"))
    for key, t in theirs.items():
        if key not in ours:
            raise ValueError(f"adapter tensor {key!r} has no place in this model: an adapter for another base model?")
        if ours[key].shape != t.shape:
            raise ValueError(f"adapter tensor {key!r} has shape {tuple(t.shape)}, this model needs "
                             f"{tuple(ours[key].shape)}: an adapter for another base model")
        with torch.no_grad():
            ours[key].copy_(t)
    missing = sorted(set(ours) - set(theirs))
    if missing:
        raise ValueError(f"adapter {path} lacks {len(missing)} tensors, e.g. {missing[0]!r}")
