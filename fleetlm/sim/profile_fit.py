"""Fit a ``TableStepModel`` to measured (step shape, seconds) samples.

Unknowns: the base time at each token knot (a piecewise-linear "hat" basis over the step's
token count) and the non-negative costs per sampled row, per decode KV token, per prefill pair,
for prefill chunks with cached context per (query, key) of their rectangle and per K/V token
read back, and per prefill attention call (``StepShape.prefill_segments``). Solved by
non-negative least squares on relative error, so a 20 ms decode step counts as much as a 1 s
prefill.

The fit estimates the *mean* step time, which is what latencies add up (a TPOT is a mean of
step times): relative errors are taken against the model's prediction (iteratively
re-weighted), not against the measured time, which would weigh slow steps less and bias the fit
low under noise. Only gross outliers are dropped (a step more than ``OUTLIER`` x slower or
faster than predicted: a garbage-collector pause, a burst of another process); the ordinary
slow-down of a shared machine stays in, as it does in the served runs the profile predicts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fleetlm.sim.step_model import StepShape, TableStepModel


def nnls(a: np.ndarray, b: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson and Hanson's active-set method)."""
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(3 * n):
        w = a.T @ (b - a @ x)
        if passive.all() or np.max(np.where(passive, -np.inf, w)) <= tol:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                x = z
                break
            neg = passive & (z <= tol)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            passive &= x > tol
    return x


def _hats(tokens: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Column k is the piecewise-linear function that is 1 at knot k and 0 at the others
    (extended linearly past the ends, as ``_interp`` does)."""
    cols = []
    for k in range(len(knots)):
        y = np.zeros(len(knots))
        y[k] = 1.0
        cols.append(np.array([_interp1(knots, y, t) for t in tokens]))
    return np.stack(cols, axis=1)


def _interp1(xs: np.ndarray, ys: np.ndarray, x: float) -> float:
    if len(xs) == 1:
        return float(ys[0])
    i = int(np.clip(np.searchsorted(xs, x, side="right"), 1, len(xs) - 1))
    return float(ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1]))


def choose_knots(tokens: Sequence[int], max_knots: int = 10) -> tuple[float, ...]:
    """Knots at powers of two spanning the measured token counts (at least two samples apart)."""
    lo, hi = max(1, min(tokens)), max(tokens)
    knots, k = [float(lo)], 1
    while k < hi:
        k *= 2
        if k > lo:
            knots.append(float(min(k, hi)))
    knots = sorted(set(knots))
    while len(knots) > max_knots:
        knots = knots[::2] + ([knots[-1]] if len(knots) % 2 == 0 else [])
    return tuple(knots)


def _features(shapes: Sequence[StepShape], knots: tuple[float, ...]) -> np.ndarray:
    tok = np.array([s.tokens for s in shapes], dtype=np.float64)
    lin = np.array([[s.sampled, s.decode_ctx, s.pairs - s.ctx_pairs, s.ctx_rect, s.ctx_kv, s.prefill_segments]
                    for s in shapes], dtype=np.float64)
    return np.concatenate([_hats(tok, np.asarray(knots)), lin], axis=1)


OUTLIER = 1.5  # a step this many times slower (or faster) than predicted is left out of the fit


def _solve(x: np.ndarray, t: np.ndarray, knots: tuple[float, ...], weight: np.ndarray) -> TableStepModel:
    """Non-negative least squares of ``weight * (x c - t)``."""
    scale = np.maximum(np.abs(x).max(axis=0), 1e-30)
    c = nnls((x / scale) * weight[:, None], t * weight) / scale
    nk = len(knots)
    return TableStepModel(knots, tuple(float(v) for v in c[:nk]), float(c[nk]), float(c[nk + 1]), float(c[nk + 2]),
                          min_s=float(t.min()) * 0.5, per_ctx_rect_s=float(c[nk + 3]), per_ctx_kv_s=float(c[nk + 4]),
                          per_prefill_segment_s=float(c[nk + 5]))


def fit_table_model(shapes: Sequence[StepShape], times: Sequence[float],
                    knots: tuple[float, ...] | None = None) -> tuple[TableStepModel, dict[str, float]]:
    """The model and its fit quality (relative errors over the samples kept, and over all)."""
    if len(shapes) < 4:
        raise ValueError(f"need at least 4 measured steps to fit a profile, got {len(shapes)}")
    t = np.asarray(times, dtype=np.float64)
    knots = knots or choose_knots([s.tokens for s in shapes])
    x = _features(shapes, knots)
    keep = np.ones(len(t), dtype=bool)
    model = _solve(x, t, knots, 1.0 / t)  # first pass: relative to the measured time
    for _ in range(4):  # then relative to the prediction, without the gross outliers
        pred = np.maximum(np.array([model.time(s) for s in shapes]), 1e-9)
        ratio = t / pred
        new_keep = (ratio < OUTLIER) & (ratio > 1.0 / OUTLIER)
        if new_keep.sum() < 4:
            break
        keep = new_keep
        model = _solve(x[keep], t[keep], knots, 1.0 / pred[keep])
    pred = np.array([model.time(s) for s in shapes])
    rel = np.abs(pred - t) / t
    stats = {"samples": len(t), "outliers_dropped": int((~keep).sum()), "median_rel_err": float(np.median(rel[keep])),
             "p90_rel_err": float(np.percentile(rel[keep], 90)), "max_rel_err": float(rel[keep].max()),
             "median_rel_err_all": float(np.median(rel)),
             "mean_ratio_measured_over_fit": float(np.mean(t[keep] / pred[keep]))}
    return model, stats
