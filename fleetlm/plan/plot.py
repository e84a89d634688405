"""Draw the roofline of a plan with its workload's points (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

from fleetlm.plan.errors import PlanError
from fleetlm.plan.report import InferenceReport


def plot_roofline(report: InferenceReport, path: str | Path) -> Path:
    """Save a log-log roofline (attainable FLOP/s vs FLOP/byte) with decode and prefill points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlanError("--plot needs matplotlib: pip install matplotlib "
                        "(or pip install 'fleetlm[plot]')") from e
    rf = report.roofline
    points = rf.points()
    lo = min([0.1, *(p.intensity / 3 for p in points)])
    hi = max([rf.ridge_intensity * 30, *(p.intensity * 3 for p in points)])
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ys = [min(rf.peak_flops, rf.mem_bandwidth * x) for x in xs]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.loglog(xs, ys, color="black", lw=2, label="roofline")
    ax.axvline(rf.ridge_intensity, color="gray", ls="--", lw=1,
               label=f"ridge {rf.ridge_intensity:,.0f} FLOP/B")
    for p in points:
        achieved = p.flops / p.time_s
        label = f"decode B={p.seqs}" if p.name == "decode" else f"prefill {p.tokens} tok"
        ax.scatter([p.intensity], [achieved], s=50, zorder=3)
        ax.annotate(f"{label}\n{p.time_s * 1e3:,.2f} ms", (p.intensity, achieved),
                    textcoords="offset points", xytext=(6, -14), fontsize=8)
    lay = report.plan.layout
    ax.set_title(f"{report.model.name} on {report.hw.name} ({report.dtype}, TP={lay.tp} "
                 f"PP={lay.pp})\npoints: FLOPs / predicted time, communication included",
                 fontsize=10)
    ax.set_xlabel("arithmetic intensity (FLOP / byte, per GPU)")
    ax.set_ylabel("attainable FLOP/s per GPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    out = Path(path)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
