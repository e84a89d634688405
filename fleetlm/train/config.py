"""Training configuration: one frozen dataclass per section, read from TOML or YAML.

Every key is checked: an unknown section or key is a ``ValueError`` naming it (with the keys
that section accepts), and so is a value of the wrong type. Command-line overrides use dotted
keys (``optimizer.lr=1e-3``), parsed as TOML values (``3``, ``1e-3``, ``true``, ``"text"``,
``[1, 2]``), with a bare word taken as a string.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetlm.models.hub import DEFAULT_MODEL


@dataclass(frozen=True)
class ModelSection:
    """``path`` (alias, GGUF file or HF directory) starts from its weights; ``size`` (a preset
    name of ``fleetlm.train.model.PRESETS``) initialises a fresh model from ``seed``."""

    path: str | None = None
    size: str | None = None
    tokenizer: str = DEFAULT_MODEL  # for a model from scratch
    seed: int = 0
    max_positions: int = 2048
    quantization: str | None = None  # int8 | int4[_gNN]: frozen quantized base weights (QLoRA; needs lora.r)


@dataclass(frozen=True)
class DataSection:
    """Text (``text``) or JSON-lines (``jsonl``, field ``jsonl_field``) files; a directory is
    searched for ``glob``; the path ``stdlib`` is this Python's standard library source."""

    paths: tuple[str, ...] = ("stdlib",)
    format: str = "text"
    glob: str = "*.py"
    jsonl_field: str = "text"
    seq_len: int = 128
    max_files: int | None = None
    max_tokens: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class ParallelismSection:
    """World = ``pp * dp_replicate * dp_shard * tp * cp``. ``dp_replicate`` is DDP
    (``replicate``), ``dp_shard`` FSDP2; ``activation_checkpointing`` is ``none``, ``full`` or
    ``every:K``."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 2
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"
    compile: bool = False
    cpu_offload: bool = False

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp * self.cp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


@dataclass(frozen=True)
class OptimizerSection:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass(frozen=True)
class ScheduleSection:
    """Linear warmup over ``warmup_steps``, then cosine down to ``min_lr_ratio * lr`` at the
    last step (``kind = "constant"`` keeps ``lr`` after the warmup)."""

    kind: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


@dataclass(frozen=True)
class TrainingSection:
    """One optimizer step sees ``micro_batch * grad_accumulation * dp`` sequences."""

    steps: int = 100
    micro_batch: int = 4
    grad_accumulation: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0


@dataclass(frozen=True)
class PrecisionSection:
    """``param_dtype`` is what forward and backward compute in (FSDP2's MixedPrecisionPolicy
    when sharded); master weights and optimizer state stay float32; ``reduce_dtype`` is the
    gradient reduction's dtype."""

    param_dtype: str = "float32"
    reduce_dtype: str = "float32"


@dataclass(frozen=True)
class CheckpointSection:
    """DCP checkpoints in ``dir/step-N`` every ``every`` steps (0: only at the end when ``dir``
    is set); ``resume`` restarts from the newest one there; ``export_hf`` writes a Hugging Face
    directory (config.json + safetensors + tokenizer) at the end."""

    dir: str | None = None
    every: int = 0
    resume: bool = False
    export_hf: str | None = None


@dataclass(frozen=True)
class LoggingSection:
    """MFU is reported when ``peak_flops`` (this rank's device, FLOP/s) is given."""

    jsonl: str | None = None
    peak_flops: float | None = None
    every: int = 1
    progress: bool = True
    plot: str | None = None


@dataclass(frozen=True)
class LoraSection:
    """LoRA adapters (rank ``r`` > 0 enables them; the base weights are then frozen)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    save_dir: str | None = None


@dataclass(frozen=True)
class MoESection:
    """Router losses of a mixture-of-experts model (fleetlm/moe/losses.py)."""

    aux_loss_coef: float | None = None  # load balancing; None: the model's router_aux_loss_coef
    z_loss_coef: float = 0.0  # router z-loss


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    lora: LoraSection = field(default_factory=LoraSection)
    moe: MoESection = field(default_factory=MoESection)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        from fleetlm.train.config_check import check_config

        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ValueError(f"unknown config section(s) {', '.join(unknown)}; known: {', '.join(sections)}")
        hints = typing.get_type_hints(cls)
        built = {name: _section(hints[name], name, raw.get(name) or {}) for name in sections}
        cfg = cls(**built)
        check_config(cfg)
        return cfg

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section(cls: type, name: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"config section [{name}] must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ValueError(f"unknown key(s) in [{name}]: {', '.join(unknown)}; known: {', '.join(hints)}")
    return cls(**{k: _coerce(f"{name}.{k}", hints[k], v) for k, v in raw.items()})


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """``value`` as type ``hint`` (ints are accepted for floats, lists for tuples)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key} must be a list, got {value!r}")
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(items) != len(value):
            raise ValueError(f"{key} must have {len(items)} items, got {len(value)}")
        return tuple(_coerce(key, a, v) for a, v in zip(items, value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ValueError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` pairs on top of ``raw`` (a new dict; ``raw`` is unchanged)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ValueError(f"override {item!r} must look like section.key=value")
        section = out.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ValueError(f"override {item!r}: {parts[0]} is not a section")
        section[parts[1]] = _parse_value(text.strip())
    return out


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    raw = read_config_file(path) if path is not None else {}
    return TrainConfig.from_dict(apply_overrides(raw, overrides or []))
