"""PNG plots: training curves and confusion matrices (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

__all__ = ["plot_confusion_matrix", "plot_curves"]


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(history: Sequence[dict], path: Path, title: str = "") -> None:
    """Loss (left) and accuracy in percent (right) per epoch from ``history`` rows (``epoch`` + metric names)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [row["epoch"] + 1 for row in history]
    losses = (("train/loss_epoch", "train loss"), ("val/loss", "val loss"), ("val_ema/loss", "val loss (EMA)"))
    for key, label in losses:
        points = [(e, row[key]) for e, row in zip(epochs, history) if key in row]
        if points:
            ax_loss.plot(*zip(*points), marker="o", ms=3, label=label)
    for key, label in (("train/acc1", "train top-1"), ("val/acc1", "val top-1"), ("val/acc5", "val top-5"),
                       ("val_ema/acc1", "val top-1 (EMA)")):
        points = [(e, 100.0 * row[key]) for e, row in zip(epochs, history) if key in row]
        if points:
            ax_acc.plot(*zip(*points), marker="o", ms=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(0, 100))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, Path(path))


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
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    _save(fig, Path(path))
