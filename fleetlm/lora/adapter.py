"""Reading a PEFT LoRA adapter for serving, checked against the base model before any request
uses it: an adapter for another model, or with a feature we do not compute, is a ``ValueError``
naming the field or tensor.

Per decoder layer, per one of our fused linear layers (``self_attn.qkv_proj``, ...), a list of
``LoRAPiece``: the rows of that layer's output a Hugging Face target owns (q rows of qkv, gate
rows of gate_up, ...), its ``A`` [r, in], ``B`` [rows, r] and the scale (``alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fleetlm.layers.lora import WHERE
from fleetlm.models.loader import ModelConfig

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# PEFT options that change the computation; we refuse them rather than serve something else
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "layers_to_transform": None,
                "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None}


@dataclass(frozen=True)
class LoRAPiece:
    target: str  # Hugging Face name: q_proj, ..., down_proj
    row_start: int
    rows: int
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [rows, r]
    scale: float


@dataclass
class LoRAWeights:
    name: str
    path: str
    r: int
    pieces: dict[int, dict[str, list[LoRAPiece]]] = field(default_factory=dict)  # layer -> module path -> pieces

    @property
    def num_params(self) -> int:
        return sum(p.A.numel() + p.B.numel() for m in self.pieces.values() for ps in m.values() for p in ps)


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """target -> (in features, out rows, first row in our fused layer)."""
    q, kv, h, i = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (h, q, 0), "k_proj": (h, kv, q), "v_proj": (h, kv, q + kv), "o_proj": (q, h, 0),
            "gate_proj": (h, i, 0), "up_proj": (h, i, i), "down_proj": (i, h, 0)}


def read_adapter_config(path: Path) -> dict:
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"LoRA adapter {str(path)!r}: no adapter_config.json (a PEFT adapter directory is needed)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"LoRA adapter {str(path)!r}: peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
    for key, neutral in _UNSUPPORTED.items():
        if cfg.get(key, neutral) not in (neutral, None, False, {}, []):
            raise ValueError(f"LoRA adapter {str(path)!r}: {key}={cfg[key]!r} is not supported for serving")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {str(path)!r}: bias={cfg['bias']!r} is not supported (only 'none')")
    r = cfg.get("r")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA adapter {str(path)!r}: r must be a positive integer, got {r!r}")
    return cfg


def load_lora_weights(name: str, path: str | Path, cfg: ModelConfig, dtype: torch.dtype,
                      layers: range | None = None) -> LoRAWeights:
    """The adapter at ``path`` for the layers in ``layers`` (this pipeline stage's; all by default)."""
    from safetensors.torch import load_file

    path = Path(path)
    acfg = read_adapter_config(path)
    r, alpha = acfg["r"], float(acfg.get("lora_alpha", acfg["r"]))
    scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
    st_file = path / "adapter_model.safetensors"
    if not st_file.is_file():
        raise ValueError(f"LoRA adapter {str(path)!r}: no adapter_model.safetensors")
    tensors = load_file(str(st_file))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(3) not in WHERE:
            raise ValueError(f"LoRA adapter {str(path)!r}: tensor {key!r} has no place in a Llama-family model")
        pairs.setdefault((int(m.group(1)), m.group(3)), {})[m.group(4)] = t
    shapes, out = _shapes(cfg), LoRAWeights(name, str(path), r)
    for (layer, target), ab in sorted(pairs.items()):
        if layer >= cfg.num_layers:
            raise ValueError(f"LoRA adapter {str(path)!r}: layer {layer} does not exist (the model has "
                             f"{cfg.num_layers}): an adapter for another base model")
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {str(path)!r}: layer {layer} {target} lacks lora_{'AB'[('A' in ab)]}")
        n_in, rows, start = shapes[target]
        if tuple(ab["A"].shape) != (r, n_in) or tuple(ab["B"].shape) != (rows, r):
            raise ValueError(f"LoRA adapter {str(path)!r}: layer {layer} {target} has A {tuple(ab['A'].shape)}, "
                             f"B {tuple(ab['B'].shape)}; this model needs A {(r, n_in)}, B {(rows, r)}: "
                             "an adapter for another base model")
        if layers is not None and layer not in layers:
            continue
        module = WHERE[target][0]
        piece = LoRAPiece(target, start, rows, ab["A"].to(dtype).contiguous(), ab["B"].to(dtype).contiguous(), scale)
        out.pieces.setdefault(layer, {}).setdefault(module, []).append(piece)
    if not pairs:
        raise ValueError(f"LoRA adapter {str(path)!r} holds no LoRA tensors")
    return out
