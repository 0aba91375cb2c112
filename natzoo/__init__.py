"""natzoo: NAT / DiNAT models on a fused neighborhood-attention op, with Lightning training and Hydra configs.

Public import paths: ``natzoo.ops`` (the op and its modules), ``natzoo.models`` (the model families on timm's
registry), ``natzoo.detection`` (backbone and detectors), the tasks (``natzoo.classification``, ``natzoo.detection``),
the run machinery (``natzoo.run``) and the tools (``natzoo.tools``). ``natzoo.train(cfg)`` and ``natzoo.evaluate(cfg)``
are the library functions behind the commands (``natzoo.cli``: ``natzoo-train``, ``natzoo-eval``, ``train.py``,
``eval.py``, ``python -m natzoo train|eval``).

The repository keeps ``ops/`` and ``models/`` as top-level folders; ``natzoo/ops`` and ``natzoo/models`` are
committed relative symlinks to them, so a source checkout (and an editable install) imports them, and static tools
resolve them, as ``natzoo.ops`` and ``natzoo.models``. An installed wheel holds them as real subpackages of ``natzoo``
(see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "train"]


def train(cfg: Any) -> dict:
    """Trains the task named by ``cfg.task``; see :func:`natzoo.run.training.run_training`."""
    from natzoo.run.training import run_training

    return run_training(cfg)


def evaluate(cfg: Any) -> dict:
    """Evaluates the task named by ``cfg.task``; see :func:`natzoo.run.evaluation.run_evaluation`."""
    from natzoo.run.evaluation import run_evaluation

    return run_evaluation(cfg)
