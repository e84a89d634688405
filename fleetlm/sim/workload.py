"""Arrivals for the simulator: synthetic (Poisson or gamma gaps) or from a trace file.

``random`` and ``shared-prefix`` draw lengths exactly as ``fleetlm bench serve`` draws them
(``fleetlm/bench/serve_datasets.py``) and, given ``num_requests``, send times with its own
``arrival_offsets``, so the same flags and seed describe the same requests in both.

Trace files (CSV with a header, or JSON lines), one request per row:
``timestamp`` (seconds, >= 0, non-decreasing), ``input_len``, ``output_len``, and optionally
``prefix_group`` + ``prefix_len`` (the first ``prefix_len`` prompt tokens are shared by every
request of that group) and ``session_id`` (a conversation: each turn's prompt is the previous
turn's prompt and output followed by ``input_len`` new tokens).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("random", "shared-prefix", "trace")


class WorkloadError(ValueError):
    """Bad workload input; the message names the file, line or flag."""


@dataclass(frozen=True)
class Arrivals:
    """Requests in arrival order, as parallel arrays (``-1``: no group / no session)."""

    t: np.ndarray
    input_len: np.ndarray
    output_len: np.ndarray
    group: np.ndarray
    prefix_len: np.ndarray
    session: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    def take(self, idx: np.ndarray) -> Arrivals:
        return Arrivals(*(a[idx] for a in (self.t, self.input_len, self.output_len, self.group,
                                           self.prefix_len, self.session)))


@dataclass(frozen=True)
class WorkloadSpec:
    """A synthetic workload: ``num_requests`` (or ``duration`` seconds) of arrivals at ``rate``
    requests/s (``inf``: all at 0) with gamma gaps of shape ``burstiness`` (1 = Poisson)."""

    dataset: str = "random"
    rate: float = math.inf
    num_requests: int | None = None
    duration: float | None = None
    burstiness: float = 1.0
    seed: int = 0
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_len: int = 512
    suffix_len: int = 128
    num_prefixes: int = 8

    def __post_init__(self) -> None:
        if self.dataset not in ("random", "shared-prefix"):
            raise WorkloadError(f"dataset {self.dataset!r}: choose random or shared-prefix (or a trace file)")
        if (self.num_requests is None) == (self.duration is None):
            raise WorkloadError("give exactly one of a number of requests or a duration")
        if self.num_requests is not None and self.num_requests < 1:
            raise WorkloadError(f"the number of requests must be >= 1, got {self.num_requests}")
        if self.duration is not None and not (self.duration > 0 and math.isfinite(self.duration)):
            raise WorkloadError(f"the duration must be a finite number of seconds > 0, got {self.duration}")
        if self.duration is not None and math.isinf(self.rate):
            raise WorkloadError("a duration needs a finite request rate")
        if not self.rate > 0 or not self.burstiness > 0:
            raise WorkloadError("the request rate and burstiness must be > 0")
        if self.input_len < 1 or self.output_len < 1:
            raise WorkloadError("input and output lengths must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise WorkloadError(f"the range ratio must be in [0, 1), got {self.range_ratio}")
        if self.dataset == "shared-prefix" and (self.prefix_len < 0 or self.suffix_len < 0
                                                or self.prefix_len + self.suffix_len < 1 or self.num_prefixes < 1):
            raise WorkloadError("shared-prefix needs prefix and suffix lengths >= 0 (sum >= 1) and >= 1 prefixes")


def _lengths(rng: np.random.Generator, n: int, length: int, ratio: float) -> np.ndarray:
    """As ``serve_datasets.random_requests``: uniform in [L(1-r), L(1+r)]."""
    lo, hi = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return rng.integers(lo, hi + 1, n)


def _times(spec: WorkloadSpec) -> np.ndarray:
    from fleetlm.bench.serve_datasets import arrival_offsets

    if spec.num_requests is not None:
        return arrival_offsets(spec.num_requests, spec.rate, spec.burstiness, spec.seed)
    assert spec.duration is not None
    mean = spec.rate * spec.duration
    n = int(mean + 8 * math.sqrt(mean) / min(spec.burstiness, 1.0) + 16)
    t = arrival_offsets(n, spec.rate, spec.burstiness, spec.seed)
    return t[t < spec.duration]


def generate(spec: WorkloadSpec) -> Arrivals:
    t = _times(spec)
    n = len(t)
    none = np.full(n, -1, dtype=np.int64)
    rng = np.random.default_rng(spec.seed)
    if spec.dataset == "random":
        inp = _lengths(rng, n, spec.input_len, spec.range_ratio)
        out = _lengths(rng, n, spec.output_len, spec.range_ratio)
        return Arrivals(t, inp, out, none, np.zeros(n, dtype=np.int64), none)
    plen = spec.prefix_len + spec.suffix_len
    group = np.arange(n, dtype=np.int64) % spec.num_prefixes if spec.prefix_len else none
    return Arrivals(t, np.full(n, plen), np.full(n, spec.output_len), group,
                    np.full(n, spec.prefix_len), none)


# -- traces ---------------------------------------------------------------------------------------
_COLUMNS = ("timestamp", "input_len", "output_len", "prefix_group", "prefix_len", "session_id")


def _rows(path: Path):
    """(line number, dict) per request, from CSV (header line) or JSON lines."""
    with path.open(newline="") as f:
        first = f.readline()
        f.seek(0)
        if first.lstrip().startswith("{"):
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise WorkloadError(f"trace {path} line {lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict):
                        raise WorkloadError(f"trace {path} line {lineno}: expected a JSON object")
                    yield lineno, obj
            return
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS[:3] if c not in (reader.fieldnames or [])]
        if missing:
            raise WorkloadError(f"trace {path}: header lacks column(s) {', '.join(missing)} "
                                f"(columns: {', '.join(_COLUMNS)})")
        for i, row in enumerate(reader, 2):
            yield i, {k: v for k, v in row.items() if v not in (None, "")}


def _num(path: Path, lineno: int, row: dict, key: str, kind: type, default=None):
    if key not in row:
        if default is None:
            raise WorkloadError(f"trace {path} line {lineno}: missing {key}")
        return default
    try:
        v = kind(row[key])
        if kind is int and float(row[key]) != v:
            raise ValueError
    except (TypeError, ValueError):
        raise WorkloadError(f"trace {path} line {lineno}: {key} {row[key]!r} is not "
                            f"{'an integer' if kind is int else 'a number'}") from None
    return v


def load_trace(path: str | Path) -> Arrivals:
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(f"trace {str(p)!r} is not a file")
    ids: dict[str, dict[str, int]] = {"prefix_group": {}, "session_id": {}}
    cols: list[list] = [[] for _ in range(6)]
    prev = 0.0
    for lineno, row in _rows(p):
        ts = _num(p, lineno, row, "timestamp", float)
        if not math.isfinite(ts) or ts < 0:
            raise WorkloadError(f"trace {p} line {lineno}: timestamp {ts} is negative or not finite")
        if ts < prev:
            raise WorkloadError(f"trace {p} line {lineno}: timestamp {ts} is before the previous one "
                                f"({prev}); timestamps must be non-decreasing")
        prev = ts
        inp = _num(p, lineno, row, "input_len", int)
        out = _num(p, lineno, row, "output_len", int)
        plen = _num(p, lineno, row, "prefix_len", int, 0)
        if inp < 1 or out < 1:
            raise WorkloadError(f"trace {p} line {lineno}: input_len and output_len must be >= 1")
        if not 0 <= plen <= inp or (plen and "prefix_group" not in row):
            raise WorkloadError(f"trace {p} line {lineno}: prefix_len must be in [0, input_len] and "
                                "needs a prefix_group")
        keys = [(ids[k].setdefault(str(row[k]), len(ids[k])) if k in row else -1)
                for k in ("prefix_group", "session_id")]
        for col, v in zip(cols, (ts, inp, out, keys[0], plen, keys[1])):
            col.append(v)
    if not cols[0]:
        raise WorkloadError(f"trace {p} holds no requests")
    t, inp, out, g, pl, s = cols
    return Arrivals(np.array(t, dtype=np.float64), np.array(inp, dtype=np.int64), np.array(out, dtype=np.int64),
                    np.array(g, dtype=np.int64), np.array(pl, dtype=np.int64), np.array(s, dtype=np.int64))


# -- prompt tokens ---------------------------------------------------------------------------------
GROUP_TOKEN_BASE = 1 << 40  # first token of a group's prefix; a request's own tokens start with its index


class PromptFactory:
    """Token ids with the prefix structure the workload describes, cheaply: a request's own part
    is ``index + 1`` followed by zeros (no two requests share a block unless the workload says
    so); a group prefix starts with a token of its own; a session turn starts with the previous
    turn's prompt and output (the fake executor's tokens), recorded when that turn arrived."""

    def __init__(self, output_token: int = 1) -> None:
        self.output_token = output_token
        self.history: dict[int, list[int]] = {}

    def prompt(self, i: int, input_len: int, output_len: int, group: int = -1, prefix_len: int = 0,
               session: int = -1) -> list[int]:
        own = [i + 1] + [0] * (input_len - 1)
        if session >= 0 and session in self.history:
            p = self.history[session] + own
        elif group >= 0 and prefix_len:
            head = [GROUP_TOKEN_BASE + group] + [0] * (prefix_len - 1)
            rest = input_len - prefix_len
            p = head + ([i + 1] + [0] * (rest - 1) if rest else [])
        else:
            p = own
        if session >= 0:
            self.history[session] = p + [self.output_token] * output_len
        return p
