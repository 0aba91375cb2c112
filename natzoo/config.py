"""Config helpers shared by the train/eval drivers and the tasks: plain-container conversion and fail-fast checks."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["plain", "check_positive_int", "check_choice", "check_common", "find_last_checkpoint"]


def plain(value: Any) -> Any:
    """OmegaConf node -> plain Python containers (resolved); other values unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_positive_int(value: Any, key: str, minimum: int = 1) -> int:
    """Returns ``int(value)``; raises ``ValueError`` naming ``key`` when it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")
    return value


def check_choice(value: Any, key: str, choices: tuple) -> Any:
    """Returns ``value``; raises ``ValueError`` naming ``key`` when it is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
    return value


def check_common(cfg: DictConfig) -> None:
    """Task-independent checks of the trainer and data sizes, run before anything heavy."""
    data = cfg.get("data") or {}
    for key in ("batch_size", "eval_batch_size"):
        if data.get(key) is not None:
            check_positive_int(data.get(key), f"data.{key}")
    if data.get("num_workers") is not None:
        check_positive_int(data.get("num_workers"), "data.num_workers", minimum=0)
    trainer = cfg.get("trainer") or {}
    if trainer.get("accumulate_grad_batches") is not None:
        check_positive_int(trainer.get("accumulate_grad_batches"), "trainer.accumulate_grad_batches")
    if trainer.get("max_epochs") is not None:
        check_positive_int(trainer.get("max_epochs"), "trainer.max_epochs")


def find_last_checkpoint(search_root: str | os.PathLike) -> Optional[Path]:
    """Newest ``last*.ckpt`` under ``search_root/*/checkpoints/`` (by modification time), or None."""
    pattern = os.path.join(glob.escape(str(search_root)), "**", "checkpoints", "last*.ckpt")
    found = [Path(p) for p in glob.glob(pattern, recursive=True)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
