"""Fit a ``TableStepModel`` to measured (step shape, seconds) samples.

Unknowns: the base time at each token knot (a piecewise-linear "hat" basis over the step's
token count) and the non-negative per-sampled-row, per-decode-context-token and per-prefill-pair
costs. Solved by non-negative least squares on relative error (each sample weighted by
1 / its time), so a 20 ms decode step counts as much as a 1 s prefill.
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


def fit_table_model(shapes: Sequence[StepShape], times: Sequence[float],
                    knots: tuple[float, ...] | None = None) -> tuple[TableStepModel, dict[str, float]]:
    """The model and its fit quality (relative errors over the samples)."""
    if len(shapes) < 4:
        raise ValueError(f"need at least 4 measured steps to fit a profile, got {len(shapes)}")
    t = np.asarray(times, dtype=np.float64)
    tok = np.array([s.tokens for s in shapes], dtype=np.float64)
    knots = knots or choose_knots([s.tokens for s in shapes])
    x = np.concatenate([_hats(tok, np.asarray(knots)),
                        np.array([[s.sampled, s.decode_ctx, s.pairs] for s in shapes], dtype=np.float64)], axis=1)
    scale = np.maximum(np.abs(x).max(axis=0), 1e-30)
    w = 1.0 / t
    coef = nnls((x / scale) * w[:, None], t * w) / scale
    nk = len(knots)
    model = TableStepModel(knots, tuple(float(c) for c in coef[:nk]), float(coef[nk]), float(coef[nk + 1]),
                           float(coef[nk + 2]), min_s=float(t.min()) * 0.5)
    pred = np.array([model.time(s) for s in shapes])
    rel = np.abs(pred - t) / t
    stats = {"samples": len(t), "median_rel_err": float(np.median(rel)), "p90_rel_err": float(np.percentile(rel, 90)),
             "max_rel_err": float(rel.max())}
    return model, stats
