"""natzoo: NAT / DiNAT models on a fused neighborhood-attention op, with Lightning training and Hydra configs.

Public import paths: ``natzoo.ops`` (the op and its modules), ``natzoo.models`` (the model families on timm's
registry), ``natzoo.detection`` (backbone and detectors) and the task code under ``natzoo``. ``natzoo.train(cfg)``
and ``natzoo.evaluate(cfg)`` are the plain functions behind ``train.py`` and ``eval.py``.

The repository keeps ``ops/`` and ``models/`` as top-level folders; ``natzoo/ops`` and ``natzoo/models`` are
committed relative symlinks to them, so a source checkout (and an editable install) imports them, and static tools
resolve them, as ``natzoo.ops`` and ``natzoo.models``. An installed wheel holds them as real subpackages of ``natzoo``
(see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "train"]


def train(cfg: Any) -> dict:
    """Trains the task named by ``cfg.task``; see :func:`natzoo.training.train`."""
    from natzoo.training import train as _train

    return _train(cfg)


def evaluate(cfg: Any) -> dict:
    """Evaluates the task named by ``cfg.task``; see :func:`natzoo.evaluation.evaluate`."""
    from natzoo.evaluation import evaluate as _evaluate

    return _evaluate(cfg)
