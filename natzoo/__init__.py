"""Lightning task code for natzoo: task registry, classification module, data modules and the train/eval drivers.

`natzoo.train(cfg)` and `natzoo.evaluate(cfg)` are the plain functions behind `train.py` and `eval.py`; they take an
OmegaConf config composed from `configs/` (see docs/training.md).
"""

from typing import Any

__all__ = ["train", "evaluate"]


def train(cfg: Any) -> dict:
    """Trains the task named by ``cfg.task``; see :func:`natzoo.training.train`."""
    from natzoo.training import train as _train

    return _train(cfg)


def evaluate(cfg: Any) -> dict:
    """Evaluates the task named by ``cfg.task``; see :func:`natzoo.evaluation.evaluate`."""
    from natzoo.evaluation import evaluate as _evaluate

    return _evaluate(cfg)
