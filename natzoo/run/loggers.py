"""The loggers of the ``logger`` config group: CSV metrics in the run directory (continued, not restarted, when a
run resumes there), TensorBoard and Weights & Biases (Lightning's loggers).

One policy for a missing package: :func:`check_logger_packages` names the package to install when a configured logger
needs one that is not installed, and the drivers call it with the config checks, before the run directory is claimed
(nothing is written). The ``loggers`` extra has both packages; ``logger=csv`` (the default) needs neither.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from natzoo.run.rundir import write_atomically

__all__ = ["RunCSVLogger", "check_logger_packages", "drop_rows_after", "tensorboard_logger", "wandb_logger"]


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer for a directory that also holds the run's other files.

    Lightning's writer warns when the directory is not empty and deletes an existing ``metrics.csv``; the run
    directory always holds Hydra's files, and a resumed run must keep the rows of its first part. This writer takes
    the existing file's columns and appends to it.
    """

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``metrics.csv`` (and ``hparams.yaml``) straight into ``save_dir`` and appending to an
    existing ``metrics.csv`` (a resumed run) instead of deleting it."""

    def __init__(self, save_dir: str | os.PathLike, flush_logs_every_n_steps: int = 100) -> None:
        super().__init__(os.fspath(save_dir), name="", version="", flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The writer (created on first use, on rank 0)."""
        if self._experiment is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        # Lightning types the attribute as fabric's base writer; ours subclasses ExperimentWriter
        return self._experiment  # type: ignore[return-value]


def drop_rows_after(path: str | os.PathLike, global_step: int) -> int:
    """Removes the rows a resumed run is about to log again from a ``metrics.csv`` of this project.

    A run resumed from a checkpoint taken at ``global_step`` repeats every optimizer step from there, so rows logged
    at a later step by the interrupted run (training rows, and validation rows of the interrupted epoch) would appear
    twice. Rows up to and including the checkpoint's end-of-epoch rows (logged at ``global_step - 1``) are kept.

    Returns:
        The number of rows removed (0 when the file does not exist).
    """
    file = Path(path)
    if not file.is_file():
        return 0
    with open(file, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        rows = list(reader)
    kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < global_step]
    if len(kept) == len(rows):
        return 0

    def write(handle: IO[str]) -> None:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)

    write_atomically(file, write)
    return len(rows) - len(kept)


# Logger targets -> (importable module names, any one of which is enough; the package to install).
_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
}


def _missing_package(target: str) -> str | None:
    """The package a logger ``_target_`` needs and that is not installed (None when it needs none or has it)."""
    lowered = target.lower()
    for key, (modules, package) in _NEEDS.items():
        if key in lowered and all(importlib.util.find_spec(m) is None for m in modules):
            return package
    return None


def check_logger_packages(loggers: Mapping[str, Any] | None) -> None:
    """Checks that every configured logger (the ``logger`` config group: name -> spec with ``_target_``) has its
    package installed.

    Raises:
        ValueError: a logger's package is missing (the message names the logger, the package and ``logger=csv``).
    """
    for name, spec in (loggers or {}).items():
        if spec is None or "_target_" not in spec:
            continue
        package = _missing_package(str(spec["_target_"]))
        if package is not None:
            raise ValueError(f"logger.{name} needs the {package} package: pip install {package} (or natzoo[loggers]); "
                             "logger=csv logs without it")


def tensorboard_logger(save_dir: str | os.PathLike, name: str = "tensorboard", **kwargs: Any) -> TensorBoardLogger:
    """Lightning's ``TensorBoardLogger`` writing event files to ``<save_dir>/<name>`` (``tensorboard --logdir``)."""
    return TensorBoardLogger(save_dir=os.fspath(save_dir), name=name, version="", **kwargs)


def wandb_logger(save_dir: str | os.PathLike, offline: bool = False, **kwargs: Any) -> WandbLogger:
    """Lightning's ``WandbLogger``; ``offline=true`` writes the run under ``<save_dir>/wandb`` without any network
    access (``wandb sync`` uploads it later). Online runs need ``wandb login`` (or ``WANDB_API_KEY``) beforehand."""
    return WandbLogger(save_dir=os.fspath(save_dir), offline=bool(offline), **kwargs)
