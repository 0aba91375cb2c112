"""PNG plots: training curves and confusion matrices (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from natzoo.run.rundir import write_atomically

__all__ = ["plot_confusion_matrix", "plot_curves"]


def _save(fig: plt.Figure, path: Path) -> None:
    try:
        write_atomically(path, lambda handle: fig.savefig(handle, format="png", dpi=110, bbox_inches="tight"), "wb")
    finally:
        plt.close(fig)


def plot_curves(history: Sequence[dict], path: Path, panels: Mapping[str, Sequence[tuple[str, str]]],
                title: str = "") -> dict[str, int]:
    """One plot per panel of the per-epoch ``history`` rows (``epoch`` + metric names), each metric a line.

    Args:
        history: rows of epoch metrics.
        path: PNG destination.
        panels: plot title -> ``(metric name, label)`` pairs; titles ending in ``(%)`` show fractions as percent.
        title: figure title.

    Returns:
        The number of lines drawn in each panel.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    epochs = [row["epoch"] for row in history]  # 0-based, as in the progress bar and metrics.csv
    drawn = {}
    for ax, (name, entries) in zip(axes[0], panels.items()):
        scale = 100.0 if name.endswith("(%)") else 1.0
        drawn[name] = 0
        for key, label in entries:
            points = [(e, scale * row[key]) for e, row in zip(epochs, history) if key in row]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=label)
                drawn[name] += 1
        ax.set(xlabel="epoch", ylabel=name, title=name)
        if scale == 100.0:
            ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        if drawn[name]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, Path(path))
    return drawn


def plot_confusion_matrix(matrix: torch.Tensor, classes: Sequence[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    counts = matrix.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * n, 0.8 + 0.5 * n))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    _save(fig, Path(path))
