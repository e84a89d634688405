"""``torch.distributed.checkpoint`` save and resume, in any data-parallel layout.

A checkpoint is ``dir/step-N/`` written by DCP (each rank its shards; keys are parameter names,
so FSDP=2 shards load into one process and back) plus ``fleetlm_train.json`` (the model's
Hugging Face config and the step), written last by rank 0: a directory without it is an
interrupted save and is skipped. The data loader's state is the step (``train/data.py``), so a
resumed run sees the same next batches; the learning-rate schedule is a function of the step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    from fleetlm.train.trainer import Trainer

META = "fleetlm_train.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def check_layout_supported(tp: int, pp: int, what: str) -> None:
    if tp > 1 or pp > 1:
        raise ValueError(f"{what} with tp or pp > 1 is not supported yet (TP/PP shards are plain tensors "
                         "without a global layout); use data parallelism (dp_replicate / dp_shard)")


def _state(tr: Trainer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(tr.root, tr.optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(tr: Trainer) -> Path:
    import torch.distributed.checkpoint as dcp

    path = Path(tr.cfg.checkpoint.dir) / f"step-{tr.step_index}"
    dcp.save(_state(tr), checkpoint_id=str(path))
    _barrier()
    if tr.layout.is_main:
        meta = {"step": tr.step_index, "hf_config": tr.tm.hf_config, "lora_r": tr.cfg.lora.r}
        (path / META).write_text(json.dumps(meta, indent=1))
    _barrier()
    return path


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    done = [(int(m.group(1)), p) for p in root.glob("step-*")
            if (m := _STEP_DIR.match(p.name)) and (p / META).exists()] if root.is_dir() else []
    return max(done)[1] if done else None


def check_same_model(meta: dict, tr: Trainer, path: Path) -> None:
    """A checkpoint of another model (or LoRA rank) is refused, naming the fields that differ."""
    ours, theirs = tr.tm.hf_config, meta.get("hf_config", {})
    diff = sorted(k for k in set(ours) | set(theirs) if k != "torch_dtype" and ours.get(k) != theirs.get(k))
    if meta.get("lora_r", 0) != tr.cfg.lora.r:
        diff.append(f"lora.r ({meta.get('lora_r', 0)} vs {tr.cfg.lora.r})")
    if diff:
        raise ValueError(f"checkpoint {path} is from another model: {', '.join(diff[:6])} differ")


def resume_latest(tr: Trainer) -> int | None:
    """Load the newest complete checkpoint under ``checkpoint.dir`` (none there: start fresh)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = latest_checkpoint(tr.cfg.checkpoint.dir)
    if path is None:
        return None
    meta = json.loads((path / META).read_text())
    check_same_model(meta, tr, path)
    state = _state(tr)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(tr.root, tr.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    step = int(meta["step"])
    tr.step_index = step
    tr.scheduler.last_epoch = step
    for group, base, fn in zip(tr.optimizer.param_groups, tr.scheduler.base_lrs, tr.scheduler.lr_lambdas):
        group["lr"] = base * fn(step)
    return step
