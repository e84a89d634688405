"""Training data: files -> token ids -> packed fixed-length sequences -> per-rank batches.

Documents (one per text file, or one per JSON line) are tokenized, each followed by EOS, and
concatenated; the stream is cut into windows of ``seq_len + 1`` tokens with stride ``seq_len``
(inputs are a window's first ``seq_len`` tokens, targets its last). Each epoch visits the
windows in a permutation drawn from ``seed + epoch``.

Step ``s`` takes the ``micro_batch * accumulation * dp`` windows at positions
``[s * G, (s + 1) * G)`` of that order (wrapping into the next epoch); micro-step ``a`` of
data-parallel rank ``r`` takes the ``micro_batch`` of them starting at ``(a * dp + r) *
micro_batch``. So the global batch of a step does not depend on the layout, and the loader's
whole state is the number of steps taken (what a checkpoint stores to resume mid-epoch).
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from fleetlm.models.tokenizer import Tokenizer
from fleetlm.train.config import DataSection


def stdlib_dir() -> Path:
    """This Python's standard library source (every machine running fleetlm has it)."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(sec: DataSection) -> list[Path]:
    out: list[Path] = []
    for p in sec.paths:
        path = stdlib_dir() if p == "stdlib" else Path(p).expanduser()
        if path.is_dir():
            out += sorted(f for f in path.rglob(sec.glob) if f.is_file() and "site-packages" not in f.parts)
        elif path.is_file():
            out.append(path)
        else:
            raise ValueError(f"data path {p!r} does not exist")
    if not out:
        raise ValueError(f"no files match {sec.glob!r} under {', '.join(sec.paths)}")
    return out[: sec.max_files] if sec.max_files else out


def _documents(path: Path, sec: DataSection):
    text = path.read_text(errors="replace")
    if sec.format == "text":
        yield text
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)[sec.jsonl_field]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: not a JSON object with a {sec.jsonl_field!r} string") from None
        yield str(doc)


def tokenize_corpus(sec: DataSection, tok: Tokenizer) -> torch.Tensor:
    """The concatenated token stream (int64), EOS after each document, capped at ``max_tokens``."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    ids: list[int] = []
    for f in list_files(sec):
        for doc in _documents(f, sec):
            ids += tok.encode(doc, add_special_tokens=False) + [eos]
        if sec.max_tokens and len(ids) >= sec.max_tokens:
            break
    return torch.tensor(ids[: sec.max_tokens] if sec.max_tokens else ids, dtype=torch.long)


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]


class PackedDataset:
    """Fixed-length windows over one token stream, in a per-epoch seeded order."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int) -> None:
        self.windows = (len(tokens) - 1) // seq_len
        if self.windows < 1:
            raise ValueError(f"the corpus has {len(tokens)} tokens: too few for one sequence of {seq_len}")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self._orders: dict[int, torch.Tensor] = {}

    def order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(self.windows, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._orders[epoch]

    def window(self, global_index: int) -> torch.Tensor:
        epoch, i = divmod(global_index, self.windows)
        start = int(self.order(epoch)[i]) * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def rows(self, first: int, n: int) -> Batch:
        w = torch.stack([self.window(first + k) for k in range(n)])
        return Batch(w[:, :-1], w[:, 1:])


@dataclass(frozen=True)
class BatchPlan:
    """Which windows each (step, micro-step, rank) reads (see module doc)."""

    micro_batch: int
    accumulation: int
    dp: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.dp

    def first(self, step: int, micro: int, dp_rank: int) -> int:
        return step * self.global_batch + (micro * self.dp + dp_rank) * self.micro_batch


def epoch_of(step: int, plan: BatchPlan, ds: PackedDataset) -> float:
    return step * plan.global_batch / ds.windows
