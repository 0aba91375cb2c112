"""Generic callbacks: per-epoch reseeding (exact resume), curve recording/plotting, evaluation stopwatch."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch

__all__ = ["EpochReseed", "CurvePlot", "Stopwatch"]


class EpochReseed(pl.Callback):
    """Reseeds torch, numpy and ``random`` at the start of every training epoch from (seed, epoch, rank).

    Each epoch's randomness (shuffling, augmentation in the main process, mixup, drop path) then depends only on the
    epoch, so a run resumed from an end-of-epoch checkpoint repeats exactly what the uninterrupted run did. (Workers
    draw their seeds from the data loader's base seed, taken from the reseeded generator when the epoch's iterator is
    created; with ``persistent_workers`` they keep their first-epoch seeds, so exact resume needs it off.)

    Args:
        seed: base seed (the config's ``seed``).
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Seeds the generators for this epoch."""
        seed = (self.seed * 1_000_003 + trainer.current_epoch * 7919 + trainer.global_rank) % (2**32)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


class CurvePlot(pl.Callback):
    """Records epoch metrics and writes a PNG of the loss and accuracy curves after every epoch (on rank 0).

    The history is part of the callback state in checkpoints, so a resumed run plots the whole run.

    Args:
        path: PNG destination.
        title: figure title.
    """

    KEYS = ("train/loss_epoch", "train/acc1", "val/loss", "val/acc1", "val/acc5", "val_ema/loss", "val_ema/acc1")

    def __init__(self, path: str, title: str = ""):
        self.path = Path(path)
        self.title = title
        self.history: list[dict] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Appends this epoch's metrics and redraws the figure."""
        metrics = trainer.callback_metrics
        row: dict[str, Any] = {"epoch": trainer.current_epoch}
        row.update({k: float(metrics[k]) for k in self.KEYS if k in metrics})
        self.history = [r for r in self.history if r["epoch"] != row["epoch"]] + [row]
        if trainer.is_global_zero:
            from natzoo.plots import plot_curves

            plot_curves(self.history, self.path, self.title)

    def state_dict(self) -> dict[str, Any]:
        """History for checkpoints."""
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the history."""
        self.history = list(state_dict.get("history", []))


class Stopwatch(pl.Callback):
    """Wall time and image count of a validation run (end-to-end throughput, data loading included)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.images = 0
        self._start: Optional[float] = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Starts the clock."""
        self._start = time.perf_counter()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Counts the batch's images."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(images, torch.Tensor):
            self.images += images.shape[0]
        elif isinstance(images, (tuple, list)):
            self.images += len(images)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stops the clock (synchronising CUDA first)."""
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
