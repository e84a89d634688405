"""Plot a simulation's timeline: utilisation, queues and KV usage over time (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

from fleetlm.sim.results import Timeline


def plot_timeline(tl: Timeline, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or pip install 'fleetlm[plot]')") from e
    rows = tl.rows
    if not rows:
        raise ValueError("--plot: the simulation recorded no timeline (no arrivals)")
    t = [r["t_s"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    for name in tl.pools:
        axes[0].plot(t, [r[f"{name}_utilisation"] for r in rows], label=name)
        axes[1].plot(t, [r[f"{name}_running"] for r in rows], label=f"{name} running")
        axes[1].plot(t, [r[f"{name}_waiting"] for r in rows], ls="--", label=f"{name} waiting")
        axes[2].plot(t, [r[f"{name}_kv_usage"] for r in rows], label=name)
    axes[3].plot(t, [r["arrivals_per_s"] for r in rows], label="arrivals")
    axes[3].plot(t, [r["completions_per_s"] for r in rows], label="completions")
    labels = ("utilisation (busy fraction)", "requests per replica", "KV cache usage", "fleet requests/s")
    for ax, label in zip(axes, labels):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("simulated time (s)")
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
