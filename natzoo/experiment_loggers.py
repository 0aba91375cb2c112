"""Experiment loggers of the ``logger`` config group beyond CSV: TensorBoard and Weights & Biases (Lightning's
loggers), each failing fast with the package to install when it is missing (the ``loggers`` extra has both)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

__all__ = ["tensorboard_logger", "wandb_logger"]


def _require(module: str, package: str, choice: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"logger={choice} needs the {package} package: pip install {package} (or natzoo[loggers]); "
                          "logger=csv logs without it")


def tensorboard_logger(save_dir: str | os.PathLike, name: str = "tensorboard", **kwargs: Any) -> TensorBoardLogger:
    """Lightning's ``TensorBoardLogger`` writing event files to ``<save_dir>/<name>`` (``tensorboard --logdir``)."""
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        _require("tensorboard", "tensorboard", "tensorboard")
    return TensorBoardLogger(save_dir=os.fspath(save_dir), name=name, version="", **kwargs)


def wandb_logger(save_dir: str | os.PathLike, offline: bool = False, **kwargs: Any) -> WandbLogger:
    """Lightning's ``WandbLogger``; ``offline=true`` writes the run under ``<save_dir>/wandb`` without any network
    access (``wandb sync`` uploads it later). Online runs need ``wandb login`` (or ``WANDB_API_KEY``) beforehand."""
    _require("wandb", "wandb", "wandb")
    return WandbLogger(save_dir=os.fspath(save_dir), offline=bool(offline), **kwargs)
