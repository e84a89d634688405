"""A replica's profile: its step-time model plus the engine limits the scheduler runs under.

Saved as JSON by ``fleetlm profile`` (measured on this machine) or built from the planner's
roofline for a catalog GPU (``fleetlm.sim.roofline_profile``). ``fleetlm sim`` and ``fleetlm
plan --fleet`` read it. A profile belongs to one model: using it for another is an error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fleetlm.sim.step_model import StepModel, StepShape, fixed_step_model, step_model_from_dict

FORMAT = "fleetlm-profile/1"


class ProfileError(ValueError):
    """A profile that cannot be used: unreadable, malformed, or for another model."""


@dataclass(frozen=True)
class EngineLimits:
    """The scheduler's knobs for one replica (``SchedulerConfig`` and ``CacheConfig``)."""

    block_size: int = 16
    num_blocks: int = 4096
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int = 8192
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ProfileError(f"engine.{name} must be an integer >= 1, got {v!r}")

    def configs(self, pp: int = 1):
        """(SchedulerConfig, CacheConfig) for ``fleetlm.core.scheduler.Scheduler``; ``pp``: steps
        the engine keeps in flight (its pipeline stages), where the scheduler takes it."""
        from dataclasses import fields

        from fleetlm.config import CacheConfig, SchedulerConfig

        extra = {"max_concurrent_batches": pp} if "max_concurrent_batches" in {f.name for f in fields(SchedulerConfig)} else {}
        return (SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, self.max_model_len, **extra),
                CacheConfig(self.block_size, self.num_blocks, self.enable_prefix_caching))


@dataclass(frozen=True)
class Profile:
    model: str
    hardware: str
    source: str  # "measured" | "roofline" | "fixed"
    step: StepModel
    engine: EngineLimits = field(default_factory=EngineLimits)
    tp: int = 1
    pp: int = 1
    dtype: str = "bf16"
    kv_bytes_per_token: int = 0  # whole replica, for P/D transfer times
    frontend_s: float = 0.0  # request in + token out between client and engine, added to TTFT/E2EL
    serve_per_token_s: float = 0.0  # serving work per streamed token on the engine's cores (CPU serving)
    assumptions: tuple[str, ...] = ()
    fit: dict[str, Any] = field(default_factory=dict)
    samples: tuple[tuple[float, ...], ...] = ()  # measured: (*StepShape, seconds)
    machine: str = ""
    created: str = ""

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def step_time(self, shape: StepShape) -> float:
        """The step model, plus ``serve_per_token_s`` per sampled row: where the server's front
        end and clients share the engine's cores (CPU serving), their work per streamed token
        (detokenize, SSE, HTTP) takes that long from the step (``sim/calibrate.py``)."""
        return self.step.time(shape) + self.serve_per_token_s * shape.sampled

    def with_engine(self, **changes: Any) -> Profile:
        """The same profile with some engine limits changed (``None`` values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, engine=replace(self.engine, **changes)) if changes else self

    def check_model(self, model: str | None, where: str = "profile") -> None:
        """Raise ``ProfileError`` if ``model`` is given and is not the profile's model."""
        if model is not None and _norm(model) != _norm(self.model):
            raise ProfileError(f"{where} is for model {self.model!r}, not {model!r}; measure one with "
                               f"'fleetlm profile --model {model}' or drop --model")

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["step"] = self.step.as_dict()
        d["samples"] = [list(s) for s in self.samples]
        d["assumptions"] = list(self.assumptions)
        return {"format": FORMAT, **d}

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.as_json(), indent=1) + "\n")
        return p


def _norm(name: str) -> str:
    return name.strip().lower().removesuffix(".gguf")


def fixed_profile(step_s: float, engine: EngineLimits | None = None, model: str = "any") -> Profile:
    """Every step takes ``step_s``: for hand-checked scenarios."""
    return Profile(model, "none", "fixed", fixed_step_model(step_s), engine or EngineLimits(),
                   assumptions=(f"every step takes {step_s * 1e3:g} ms",))


def profile_from_json(d: Any, where: str = "profile") -> Profile:
    if not isinstance(d, dict):
        raise ProfileError(f"{where}: not a JSON object")
    if d.get("format") != FORMAT:
        raise ProfileError(f"{where}: format is {d.get('format')!r}, expected {FORMAT!r} "
                           "(a file written by 'fleetlm profile')")
    missing = [k for k in ("model", "hardware", "source", "step") if k not in d]
    if missing:
        raise ProfileError(f"{where}: missing field(s) {', '.join(missing)}")
    try:
        step = step_model_from_dict(d["step"])
        engine = EngineLimits(**d.get("engine", {}))
    except (TypeError, ValueError) as e:
        raise ProfileError(f"{where}: {e}") from None
    known = {"tp", "pp", "dtype", "kv_bytes_per_token", "frontend_s", "serve_per_token_s", "fit", "machine", "created"}
    extra = {k: d[k] for k in known if k in d}
    return Profile(str(d["model"]), str(d["hardware"]), str(d["source"]), step, engine,
                   assumptions=tuple(d.get("assumptions", ())),
                   samples=tuple(tuple(s) for s in d.get("samples", ())), **extra)


def load_profile(path: str | Path) -> Profile:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except OSError as e:
        raise ProfileError(f"cannot read profile {str(p)!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"profile {str(p)!r} is not valid JSON ({e.msg}, line {e.lineno})") from None
    return profile_from_json(d, f"profile {str(p)!r}")
