"""Checks on a whole ``TrainConfig`` that need no model or process group (those that do run
in ``fleetlm.train.parallel`` before any step)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetlm.train.config import TrainConfig

DTYPES = ("float32", "bfloat16")
PP_SCHEDULES = ("gpipe", "1f1b")
SCHEDULES = ("cosine", "constant")
FORMATS = ("text", "jsonl")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} = {value!r}; accepted values: {', '.join(allowed)}")


def _positive(key: str, value: int | float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{key} must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def parse_checkpointing(text: str) -> int:
    """``none`` -> 0, ``full`` -> 1 (every layer), ``every:K`` -> K."""
    if text == "none":
        return 0
    if text == "full":
        return 1
    head, _, k = text.partition(":")
    if head == "every" and k.isdigit() and int(k) > 0:
        return int(k)
    raise ValueError(f"parallelism.activation_checkpointing = {text!r}; accepted: none, full, every:K (K > 0)")


def check_config(cfg: TrainConfig) -> None:
    m, d, p, t = cfg.model, cfg.data, cfg.parallelism, cfg.training
    if (m.path is None) == (m.size is None):
        raise ValueError("set exactly one of model.path (start from weights) and model.size (from scratch)")
    from fleetlm.models.hub import DEFAULT_MODEL

    if m.path is not None and (m.seed != 0 or m.tokenizer != DEFAULT_MODEL):
        raise ValueError("model.seed and model.tokenizer are for a model from scratch (model.size); "
                         "model.path brings its own weights and tokenizer")
    _choice("data.format", d.format, FORMATS)
    if cfg.moe.aux_loss_coef is not None:
        _positive("moe.aux_loss_coef", cfg.moe.aux_loss_coef, zero_ok=True)
    _positive("moe.z_loss_coef", cfg.moe.z_loss_coef, zero_ok=True)
    _positive("data.seq_len", d.seq_len)
    if not d.paths:
        raise ValueError("data.paths is empty")
    for key in ("dp_replicate", "dp_shard", "tp", "pp", "cp", "pp_microbatches"):
        _positive(f"parallelism.{key}", getattr(p, key))
    _choice("parallelism.pp_schedule", p.pp_schedule, PP_SCHEDULES)
    parse_checkpointing(p.activation_checkpointing)
    from fleetlm.train.context_parallel import check_cp

    check_cp(cfg)
    if p.compile and (p.pp > 1 or p.tp > 1):
        raise ValueError("parallelism.compile is supported with data parallelism only (not with tp or pp)")
    if p.cpu_offload:
        raise ValueError("parallelism.cpu_offload is for CUDA (FSDP2's CPUOffloadPolicy); "
                         "training here runs on CPU, where parameters already live")
    if p.pp > 1 and t.micro_batch % p.pp_microbatches:
        raise ValueError(f"training.micro_batch {t.micro_batch} is not divisible by "
                         f"parallelism.pp_microbatches {p.pp_microbatches}")
    if p.pp > 1 and t.grad_accumulation > 1:
        raise ValueError("pipeline parallelism splits a batch into pp_microbatches itself; "
                         "set training.grad_accumulation to 1")
    if p.pp > 1 and (p.dp > 1 or p.tp > 1):
        raise ValueError("pipeline parallelism composes with nothing else yet (set dp_* and tp to 1)")
    if p.tp > 1 and p.dp_replicate > 1:
        raise ValueError("tensor parallelism composes with dp_shard (FSDP), not dp_replicate")
    for key in ("steps", "micro_batch", "grad_accumulation"):
        _positive(f"training.{key}", getattr(t, key))
    if t.max_grad_norm is not None:
        _positive("training.max_grad_norm", t.max_grad_norm)
    _positive("optimizer.lr", cfg.optimizer.lr)
    _choice("schedule.kind", cfg.schedule.kind, SCHEDULES)
    _positive("schedule.warmup_steps", cfg.schedule.warmup_steps, zero_ok=True)
    _choice("precision.param_dtype", cfg.precision.param_dtype, DTYPES)
    _choice("precision.reduce_dtype", cfg.precision.reduce_dtype, DTYPES)
    _positive("checkpoint.every", cfg.checkpoint.every, zero_ok=True)
    if (cfg.checkpoint.every or cfg.checkpoint.resume) and not cfg.checkpoint.dir:
        raise ValueError("checkpoint.every / checkpoint.resume need checkpoint.dir")
    _positive("logging.every", cfg.logging.every)
    _check_unused_parallel(cfg)
    _check_lora(cfg)
    _check_qlora(cfg)


def _qlora_formats() -> tuple[str, ...]:
    """The weight-only formats (``fleetlm/quantization``): what a frozen base can be trained over."""
    from fleetlm.quantization import quantization_names

    return tuple(n for n in quantization_names() if n.startswith(("int8", "int4")))


def _check_qlora(cfg: TrainConfig) -> None:
    """``model.quantization``: the base weights frozen in a weight-only format, adapters trained."""
    q, p = cfg.model.quantization, cfg.parallelism
    if q is None:
        return
    _choice("model.quantization", q, _qlora_formats())
    if cfg.model.size is not None:
        raise ValueError("model.quantization quantizes a pretrained model (model.path) for QLoRA; "
                         "a model from scratch (model.size) trains its full weights")
    if not cfg.lora.r:
        raise ValueError("model.quantization freezes the base weights in int8/int4: set lora.r > 0 to train "
                         "adapters (QLoRA)")
    if p.tp > 1 or p.pp > 1 or p.dp_shard > 1 or p.cp > 1:
        raise ValueError("model.quantization (QLoRA) runs on one process or with parallelism.dp_replicate "
                         "(DDP); set tp, pp, dp_shard and cp to 1")


def _check_unused_parallel(cfg: TrainConfig) -> None:
    """Settings that only mean something in some layouts are refused in the others."""
    p = cfg.parallelism
    if p.pp == 1 and (p.pp_schedule != "1f1b" or p.pp_microbatches != 2):
        raise ValueError("parallelism.pp_schedule / pp_microbatches need parallelism.pp > 1")
    if p.dp_shard == 1 and not p.reshard_after_forward:
        raise ValueError("parallelism.reshard_after_forward is an FSDP setting: it needs dp_shard > 1")
    if p.dp_shard == 1 and cfg.precision.reduce_dtype != "float32":
        raise ValueError("precision.reduce_dtype is an FSDP setting: it needs parallelism.dp_shard > 1")


def _check_lora(cfg: TrainConfig) -> None:
    lo = cfg.lora
    _positive("lora.r", lo.r, zero_ok=True)
    if lo.r == 0:
        if lo.save_dir:
            raise ValueError("lora.save_dir is set but lora.r = 0 (LoRA off)")
        return
    if not 0 <= lo.dropout < 1:
        raise ValueError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    from fleetlm.layers.lora import TARGETS

    bad = sorted(set(lo.target_modules) - set(TARGETS))
    if bad or not lo.target_modules:
        raise ValueError(f"lora.target_modules {', '.join(bad) or '(empty)'}: accepted {', '.join(TARGETS)}")
    if cfg.parallelism.pp > 1:
        raise ValueError("LoRA with pipeline parallelism is not supported")
