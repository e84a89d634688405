"""Step-time models: how long one engine step takes, given what the step holds.

A step is summarised by a ``StepShape`` (see ``shape_of``), computed from the scheduler's own
``SchedulerOutput`` and the requests it names, the same way for the real engine (``fleetlm
profile`` records shapes and times) and for the simulator (which turns shapes into times):

- ``tokens``: tokens computed this step (K/V written), excluding prompt tokens whose K/V
  arrived by transfer from a prefill worker (P/D);
- ``sampled``: rows that sample a token (a partial prefill chunk does not);
- ``decode_ctx``: sum over decode rows (one new token after the prompt, or a transferred prompt)
  of the keys they attend to (their KV length after the step);
- ``pairs``: sum over prefill chunks ``[s, e)`` of causal (query, key) pairs,
  ``sum_{p=s}^{e-1} (p + 1)``;
- ``kv_tokens``: KV tokens read or written: a decode row reads its context; a chunk reads its
  ``e`` tokens and writes ``e - s``;
- for prefill chunks with cached context (``s > 0``: a prefix-cache hit or a later chunk), which
  engines often run on a slower path (K/V read back from the blocks, a masked attention):
  ``ctx_pairs`` (their share of ``pairs``), ``ctx_rect`` (``(e - s) * e``, every (query, key)
  of the rectangle a masked kernel computes) and ``ctx_kv`` (``e``, the K/V read back);
- ``prefill_segments``: prefill chunks that run one attention call each: all of them unless they
  are two or more of equal length and none has cached context (then one batched call, as
  fleetlm's CPU attention backends do it, ``attention/torch_paged.py``).

Two models turn a shape into seconds:

- ``TableStepModel`` (measured): ``base(tokens) + a_sampled * sampled + a_ctx * decode_ctx +
  a_pairs * (pairs - ctx_pairs) + a_rect * ctx_rect + a_read * ctx_kv + a_seg *
  prefill_segments``, ``base`` piecewise linear between measured token counts (knots), linear
  beyond the last knot.
- ``RooflineStepModel`` (catalog GPUs): ``overhead + max(FLOPs / (peak * mfu), bytes / (bw *
  mbu)) + communication``, with FLOPs and bytes linear in the shape (coefficients taken from
  ``fleetlm.plan.roofline.step_cost``; weight bytes and communication tabulated over tokens).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple


class StepShape(NamedTuple):
    tokens: int = 0
    sampled: int = 0
    decode_ctx: int = 0
    pairs: int = 0
    kv_tokens: int = 0
    seqs: int = 0
    ctx_pairs: int = 0
    ctx_rect: int = 0
    ctx_kv: int = 0
    prefill_segments: int = 0


def chunk_pairs(start: int, end: int) -> int:
    """Causal (query, key) pairs of a prefill chunk of positions ``[start, end)``."""
    return (end * (end + 1) - start * (start + 1)) // 2


def shape_of(num_scheduled: dict[str, int], requests: dict[str, Any],
             transferred: set[str] | frozenset[str] = frozenset()) -> tuple[StepShape, list[bool]]:
    """The shape of a step already scheduled (``num_computed_tokens`` counts its tokens), and
    for each scheduled request, in order, whether it samples a token this step.

    ``transferred``: ids of requests whose prompt K/V arrived from elsewhere and whose prompt has
    not been scheduled yet here; their prompt tokens cost nothing (a decode row instead).
    """
    tokens = sampled = decode_ctx = pairs = kv = ctx_pairs = ctx_rect = ctx_kv = chunks = 0
    lens: set[int] = set()
    samples = []
    for rid, n in num_scheduled.items():
        r = requests[rid]
        end = r.num_computed_tokens
        s = end >= r.num_tokens
        samples.append(s)
        sampled += s
        start = end - n
        if rid in transferred:
            decode_ctx += end
            kv += end
        elif n == 1 and start >= r.num_prompt_tokens:
            tokens += 1
            decode_ctx += end
            kv += end
        else:
            tokens += n
            p = (end * (end + 1) - start * (start + 1)) // 2
            pairs += p
            kv += end + n
            chunks += 1
            lens.add(n)
            if start:
                ctx_pairs += p
                ctx_rect += n * end
                ctx_kv += end
    segments = 0 if chunks > 1 and len(lens) == 1 and not ctx_kv else chunks
    shape = StepShape(tokens, sampled, decode_ctx, pairs, kv, len(num_scheduled), ctx_pairs, ctx_rect, ctx_kv,
                      segments)
    return shape, samples


def _interp(knots: tuple[float, ...], values: tuple[float, ...], x: float) -> float:
    """Piecewise linear through (knots, values), extended linearly past both ends."""
    if len(knots) == 1:
        return values[0]
    i = min(max(bisect_right(knots, x), 1), len(knots) - 1)
    x0, x1, y0, y1 = knots[i - 1], knots[i], values[i - 1], values[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class TableStepModel:
    """Measured: ``base(tokens) + per_sampled * sampled + per_decode_ctx * decode_ctx +
    per_pair * (pairs - ctx_pairs) + per_ctx_rect * ctx_rect + per_ctx_kv * ctx_kv`` seconds
    (never below ``min_s``)."""

    knots: tuple[float, ...]
    base_s: tuple[float, ...]
    per_sampled_s: float = 0.0
    per_decode_ctx_s: float = 0.0
    per_pair_s: float = 0.0
    min_s: float = 0.0
    per_ctx_rect_s: float = 0.0
    per_ctx_kv_s: float = 0.0
    per_prefill_segment_s: float = 0.0

    kind = "table"

    def __post_init__(self) -> None:
        if not self.knots or len(self.knots) != len(self.base_s):
            raise ValueError("step model: knots and base_s must be non-empty and of equal length")
        if any(b <= a for a, b in zip(self.knots, self.knots[1:])):
            raise ValueError(f"step model: knots must increase strictly, got {list(self.knots)}")

    def time(self, s: StepShape) -> float:
        t = (_interp(self.knots, self.base_s, s.tokens) + self.per_sampled_s * s.sampled
             + self.per_decode_ctx_s * s.decode_ctx + self.per_pair_s * (s.pairs - s.ctx_pairs)
             + self.per_ctx_rect_s * s.ctx_rect + self.per_ctx_kv_s * s.ctx_kv
             + self.per_prefill_segment_s * s.prefill_segments)
        return max(t, self.min_s)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class RooflineStepModel:
    """``overhead + max(flops / (peak * mfu), bytes / (bw * mbu)) + comm(tokens)`` seconds, per
    GPU of one replica (pipeline stages run one after another: the latency view)."""

    peak_flops: float
    mem_bandwidth: float
    flops_per_token: float
    flops_per_sampled: float
    flops_per_pair: float
    bytes_per_kv_token: float
    knots: tuple[float, ...]  # tokens
    base_bytes: tuple[float, ...]  # weights + activations + embedding rows at that token count
    comm_s: tuple[float, ...]
    mfu: float = 0.6
    mbu: float = 0.8
    overhead_s: float = 0.0

    kind = "roofline"

    def __post_init__(self) -> None:
        if not 0 < self.mfu <= 1 or not 0 < self.mbu <= 1:
            raise ValueError(f"roofline efficiencies must be in (0, 1], got mfu={self.mfu} mbu={self.mbu}")
        if not (len(self.knots) == len(self.base_bytes) == len(self.comm_s) >= 1):
            raise ValueError("step model: knots, base_bytes and comm_s must have equal non-zero length")

    def parts(self, s: StepShape) -> tuple[float, float, float]:
        """(compute seconds, memory seconds, communication seconds) at the stated efficiencies."""
        flops = (self.flops_per_token * s.tokens + self.flops_per_sampled * s.sampled
                 + self.flops_per_pair * (s.pairs + s.decode_ctx))
        nbytes = _interp(self.knots, self.base_bytes, s.tokens) + self.bytes_per_kv_token * s.kv_tokens
        comm = _interp(self.knots, self.comm_s, s.tokens) if s.tokens else 0.0
        return flops / (self.peak_flops * self.mfu), nbytes / (self.mem_bandwidth * self.mbu), comm

    def time(self, s: StepShape) -> float:
        c, m, comm = self.parts(s)
        return self.overhead_s + max(c, m) + comm

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


StepModel = TableStepModel | RooflineStepModel


def fixed_step_model(step_s: float) -> TableStepModel:
    """Every step takes ``step_s`` seconds, whatever it holds (tests, hand-checked scenarios)."""
    if not step_s > 0:
        raise ValueError(f"a fixed step time must be > 0 seconds, got {step_s}")
    return TableStepModel((1.0,), (float(step_s),))


def step_model_from_dict(d: dict[str, Any]) -> StepModel:
    d = dict(d)
    kind = d.pop("kind", None)
    cls = {"table": TableStepModel, "roofline": RooflineStepModel}.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"step_model.kind must be 'table' or 'roofline', got {kind!r}")
    for k in ("knots", "base_s", "base_bytes", "comm_s"):
        if k in d:
            d[k] = tuple(float(x) for x in d[k])
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"step_model ({kind}): {e}") from None
