"""Training curves as a PNG (matplotlib, headless, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detseg.fileio import atomic_output


def plot_history(history: Any, path: str | Path, metric: str) -> None:
    """Loss against step (left) and ``metric`` of each evaluation against step (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6))
    if history.train:
        ax_loss.plot([r["step"] for r in history.train], [r["loss"] for r in history.train])
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    evals = [r for r in history.evals if metric in r]
    if evals:
        ax_metric.plot([r["step"] for r in evals], [r[metric] for r in evals], marker="o")
    ax_metric.set(xlabel="step", ylabel=metric, title=f"validation {metric}")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
