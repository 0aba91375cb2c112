"""Helpers for tests and scripted runs: compose the real configs with Hydra's compose API and shrink them."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from natzoo.run.hydra_setup import register_with_hydra

__all__ = ["CONFIG_DIR", "CrashAtStep", "InterruptAtStep", "SigtermAtStep", "compose_config", "tiny_overrides"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the repository's configs/ (a link in a checkout)


def compose_config(config_name: str, overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> DictConfig:
    """Composes ``configs/<config_name>.yaml`` with ``overrides`` (Hydra override syntax), outside ``@hydra.main``.

    ``paths.output_dir`` (normally Hydra's run directory) is set to ``output_dir`` when given.
    """
    register_with_hydra()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def tiny_overrides(data_root: str | Path, log_dir: str | Path, epochs: int = 2) -> list[str]:
    """Overrides that shrink the default training config to a few CPU-seconds: the ``debug=tiny`` preset
    (``configs/debug/tiny.yaml``) with the dataset in ``data_root``, logs under ``log_dir`` and ``epochs`` epochs."""
    return ["debug=tiny", f"data.root={data_root}", f"paths.log_dir={log_dir}", f"sched.epochs={epochs}"]


class CrashAtStep(pl.Callback):
    """Raises ``RuntimeError`` when the given global step starts (simulates a crash mid-epoch)."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        """Crashes at ``step``."""
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at global step {self.step}")


class InterruptAtStep(CrashAtStep):
    """Raises ``KeyboardInterrupt`` when the given global step starts (simulates Ctrl-C mid-epoch)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        """Interrupts at ``step``."""
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class SigtermAtStep(CrashAtStep):
    """Sends SIGTERM to its own process when the given global step starts (simulates a scheduler stopping the job)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        """Signals at ``step``."""
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
