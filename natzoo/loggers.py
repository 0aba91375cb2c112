"""CSV metrics in the run directory, continued (not restarted) when a run resumes there."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import IO

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from natzoo.rundir import write_atomically

__all__ = ["RunCSVLogger", "drop_rows_after"]


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
