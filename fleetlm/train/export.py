"""Export a trained model as a Hugging Face directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) that transformers and ``fleetlm serve`` load, and LoRA
adapters in the PEFT layout (``adapter_config.json``, ``adapter_model.safetensors``).

Our fused ``qkv_proj`` and ``gate_up_proj`` are split back into the Hugging Face matrices; a
tied head is written once (as the embedding). Every rank must call these (the full state dict is
gathered from FSDP shards); rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from fleetlm.distributed.parallel_state import get_tp_group, parallel_state

if TYPE_CHECKING:
    from fleetlm.train.trainer import Trainer


def full_state_dict(tr: Trainer) -> dict[str, torch.Tensor]:
    """The whole model's tensors in our names, on every rank (FSDP2 shards and TP slices
    gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if tr.cfg.parallelism.dp_shard > 1:  # FSDP2 shards: gathered on every rank (TP peers need them)
        sd = get_model_state_dict(tr.root, options=StateDictOptions(full_state_dict=True))
    else:
        sd = {k: v.detach() for k, v in tr.root.state_dict().items()}
    sd = {k.removeprefix("lm."): v for k, v in sd.items()}
    return gather_tp(sd, tr.tm.hf_config) if parallel_state().tp_size > 1 else sd


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(parallel_state().tp_size)]
    dist.all_gather(parts, t.contiguous(), group=get_tp_group())
    return parts


def gather_tp(sd: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """This TP rank's slices -> the full tensors in our layout (every TP rank gets them).
    Fused layers hold ``[q_r, k_r, v_r]`` / ``[gate_r, up_r]`` per rank, so each part is
    reassembled from every rank's piece; row-parallel weights join along their input dim."""
    h, d = hf_config["num_attention_heads"], hf_config["head_dim"]
    kv, tp = hf_config["num_key_value_heads"], parallel_state().tp_size
    out = {}
    for name, t in sd.items():
        if ".qkv_proj." in name:
            sizes = [h // tp * d, kv // tp * d, kv // tp * d]
            pieces = [p.split(sizes) for p in _gather(t)]
            out[name] = torch.cat([torch.cat([p[i] for p in pieces]) for i in range(3)])
        elif ".gate_up_proj." in name:
            pieces = [p.chunk(2) for p in _gather(t)]
            out[name] = torch.cat([torch.cat([p[i] for p in pieces]) for i in range(2)])
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            out[name] = torch.cat(_gather(t), dim=1)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = torch.cat(_gather(t))[: hf_config["vocab_size"]]
        else:
            out[name] = t
    return out


def hf_tensors(sd: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """Our parameter names and fused matrices -> Hugging Face names and matrices."""
    h, d = hf_config["num_attention_heads"], hf_config["head_dim"]
    kv = hf_config["num_key_value_heads"]
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if ".lora." in name or (name == "lm_head.weight" and hf_config["tie_word_embeddings"]):
            continue
        t = t.detach().float().contiguous()
        if ".qkv_proj." in name:
            for part, piece in zip(("q", "k", "v"), t.split([h * d, kv * d, kv * d])):
                out[name.replace(".qkv_proj.", f".{part}_proj.")] = piece.contiguous()
        elif ".gate_up_proj." in name:
            gate, up = t.chunk(2)
            out[name.replace(".gate_up_proj.", ".gate_proj.")] = gate.contiguous()
            out[name.replace(".gate_up_proj.", ".up_proj.")] = up.contiguous()
        elif name == "model.embed_tokens.weight" or name == "lm_head.weight":
            out[name] = t[: hf_config["vocab_size"]].contiguous()
        else:
            out[name] = t
    return out


def save_tokenizer(tok, out: Path) -> None:
    tok.backend.save(str(out / "tokenizer.json"))
    decode = tok.backend.id_to_token
    cfg = {"chat_template": tok.chat_template,
           "eos_token": decode(tok.eos_token_id) if tok.eos_token_id is not None else None,
           "bos_token": decode(tok.bos_token_id) if tok.bos_token_id is not None else None}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def export_hf(tr: Trainer, out: str | Path) -> Path:
    from safetensors.torch import save_file

    from fleetlm.train.checkpoint import check_layout_supported

    check_layout_supported(1, tr.cfg.parallelism.pp, "checkpoint.export_hf")
    sd = full_state_dict(tr)
    out = Path(out)
    if tr.layout.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file(hf_tensors(sd, tr.tm.hf_config), str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(tr.tm.hf_config, indent=1))
        save_tokenizer(tr.tm.tokenizer, out)
    return out


def export_lora(tr: Trainer, out: str | Path) -> Path:
    from fleetlm.layers.lora import save_peft_adapter

    sd = full_state_dict(tr)
    out = Path(out)
    if tr.layout.is_main:
        save_peft_adapter(sd, tr.cfg.lora, out, base=tr.cfg.model.path or "")
    return out
