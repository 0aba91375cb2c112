"""Generic callbacks: RNG state in checkpoints (exact resume), curve recording/plotting, evaluation stopwatch, model
summary."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.rank_zero import rank_zero_only

__all__ = ["CurvePlot", "ModelSummary", "RNGState", "Stopwatch"]

log = logging.getLogger(__name__)


class ModelSummary(LightningModelSummary):
    """Lightning's model summary without its "0 Total Flops" line: Lightning counts FLOPs only for modules with an
    ``example_input_array``, and natzoo's modules have none, so the count is always 0."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        """Logs the summary table, without the FLOPs line when nothing was counted."""
        from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *summary_data)
        if not total_flops:
            table = "\n".join(line for line in table.splitlines() if not line.endswith("Total Flops"))
        log.info("\n" + table)


class RNGState(pl.Callback):
    """Saves the global random generators (python, numpy, torch, CUDA) in checkpoints and restores them on resume.

    Lightning does not checkpoint RNG state, so without this a resumed run reshuffles, re-augments, re-mixes and
    re-drops differently from the uninterrupted run. The state is taken when the checkpoint is written (end of an
    epoch for ``last.ckpt``) and restored before the data loaders' first iterator is created, so a run resumed from
    an end-of-epoch checkpoint repeats exactly what the uninterrupted run did on the same hardware. (Workers draw
    their seeds from the loader's base seed, taken from the restored generator; with ``persistent_workers`` they keep
    their first-epoch generators, so exact resume needs it off.) Only rank 0's state is saved; other ranks derive
    distinct states from it and their rank.
    """

    def state_dict(self) -> dict[str, Any]:
        """Current generator states as plain values (loadable with ``weights_only=True``)."""
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": [version, list(internal), gauss],
            # get_state() without legacy=False is the 5-tuple; numpy's stubs give the union with the dict form
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],  # type: ignore[attr-defined]
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the generators (offset by the process rank on ranks other than 0)."""
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            states = state_dict["cuda"]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        # Lightning sets rank_zero_only.rank on the function at start-up
        rank = rank_zero_only.rank  # type: ignore[attr-defined]
        if rank:
            # An independent stream per rank, derived from rank 0's restored state and the rank.
            base = int(torch.randint(0, 2**31 - 1, ()).item())
            seed = int(np.random.SeedSequence([base, rank]).generate_state(1)[0])
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)


class CurvePlot(pl.Callback):
    """Records a task's epoch metrics and writes a PNG of its curves after every epoch (on rank 0).

    Training metrics are taken at the end of every training epoch, validation metrics (names starting with ``val``)
    only in epochs that ran a validation (``trainer.check_val_every_n_epoch`` may skip some). The history is part of
    the callback state in checkpoints, so a resumed run plots the whole run.

    Args:
        path: PNG destination.
        panels: one plot per entry: title -> ``(metric name, label)`` pairs (the task's ``curves``); titles ending in
            ``(%)`` show fractions as percent.
        title: figure title.
    """

    def __init__(self, path: str, panels: Mapping[str, Sequence[tuple[str, str]]], title: str = ""):
        self.path = Path(path)
        self.panels = {name: tuple(tuple(entry) for entry in entries) for name, entries in panels.items()}
        self.title = title
        self.history: list[dict] = []
        self._validated_epoch = -1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Notes that this epoch ran a validation."""
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Appends this epoch's metrics and redraws the figure."""
        metrics = trainer.callback_metrics
        validated = self._validated_epoch == trainer.current_epoch
        keys = {key for entries in self.panels.values() for key, _ in entries}
        num_classes = getattr(pl_module, "num_classes", None)
        if num_classes is not None and int(num_classes) <= 5:
            keys = {key for key in keys if "acc5" not in key}  # top-5 of 5 classes or fewer is always 100 %
        row: dict[str, Any] = {"epoch": trainer.current_epoch}
        row.update({k: float(metrics[k]) for k in sorted(keys)
                    if k in metrics and (validated or not k.startswith("val"))})
        self.history = [r for r in self.history if r["epoch"] != row["epoch"]] + [row]
        if trainer.is_global_zero:
            from natzoo.plots import plot_curves

            # every panel entry is a (metric, label) pair
            plot_curves(self.history, self.path, self.panels, self.title)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        """History for checkpoints."""
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the history."""
        self.history = list(state_dict.get("history", []))


class Stopwatch(pl.Callback):
    """Wall time and image count of validation runs: end to end (data loading included) and in the steps alone.

    Attributes:
        seconds: validation epoch wall time.
        step_seconds: time inside the validation steps (forward and metric updates, no data loading).
        images: images seen.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.step_seconds = 0.0
        self.images = 0
        self._start: float | None = None
        self._step_start: float | None = None

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Starts the epoch clock."""
        self._start = time.perf_counter()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        """Starts the step clock."""
        self._sync(pl_module)
        self._step_start = time.perf_counter()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Stops the step clock and counts the batch's images."""
        self._sync(pl_module)
        if self._step_start is not None:
            self.step_seconds += time.perf_counter() - self._step_start
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(images, torch.Tensor):
            self.images += images.shape[0]
        elif isinstance(images, (tuple, list)):
            self.images += len(images)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stops the epoch clock."""
        self._sync(pl_module)
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
