"""Per-step metrics: loss, learning rate, grad norm, tokens/s, MFU, peak memory; a JSONL log,
a progress bar, and a loss-curve PNG.

FLOPs per token are ``6 N`` (N trainable + frozen matrix params the step runs through, i.e. all
parameters) plus attention ``6 L H d T`` (the ``fleetlm plan`` training formula), so MFU here and
the planner's use one definition. Peak memory on CPU is the process's peak resident set
(``ru_maxrss``); on CUDA the allocator's peak.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StepMetrics:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float
    tokens_per_s: float
    mfu: float | None
    peak_memory_bytes: int


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def flops_per_token(n_params: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int) -> float:
    return 6.0 * n_params + 6.0 * num_layers * num_heads * head_dim * seq_len


class MetricsLog:
    """Writes rank 0's metrics (JSONL, progress bar) and keeps them for the plot."""

    def __init__(self, jsonl: str | None, progress: bool, total_steps: int, enabled: bool) -> None:
        self.rows: list[StepMetrics] = []
        self.enabled = enabled
        self._file = open(jsonl, "a") if (jsonl and enabled) else None  # noqa: SIM115
        self._bar = None
        if progress and enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", file=sys.stderr)

    def record(self, m: StepMetrics, write: bool) -> None:
        self.rows.append(m)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{m.loss:.4f}", tok_s=f"{m.tokens_per_s:.0f}")
        if self._file is not None and write:
            self._file.write(json.dumps(asdict(m)) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()


def plot_loss(rows: list[StepMetrics], out: str | Path, title: str = "training loss") -> None:
    """Loss against step (needs matplotlib: ``pip install fleetlm[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'fleetlm[plot]'") from None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r.step for r in rows], [r.loss for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
