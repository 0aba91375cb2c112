"""natzoo: NAT / DiNAT models on a fused neighborhood-attention op, with Lightning training and Hydra configs.

Public import paths: ``natzoo.ops`` (the op and its modules), ``natzoo.models`` (the model families on timm's
registry), ``natzoo.detection`` (backbone and detectors) and the task code under ``natzoo``. ``natzoo.train(cfg)``
and ``natzoo.evaluate(cfg)`` are the plain functions behind ``train.py`` and ``eval.py``.

The repository keeps ``ops/`` and ``models/`` as top-level folders. An installed wheel holds them as real
subpackages of ``natzoo``; in a source checkout (an editable install, or ``python train.py`` from the repository
root) the finder below maps ``natzoo.ops`` and ``natzoo.models`` onto those folders, so one set of files is
imported under exactly one name.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Any

__all__ = ["evaluate", "train"]

_SOURCE_SUBPACKAGES = ("ops", "models")


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Resolves ``natzoo.ops`` / ``natzoo.models`` to the repository's top-level ``ops/`` / ``models/`` folders."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.rpartition(".")
        if prefix != __name__ or name not in _SOURCE_SUBPACKAGES:
            return None
        folder = self.root / name
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def _map_source_tree() -> None:
    here = Path(__file__).resolve().parent
    if any((here / name).is_dir() for name in _SOURCE_SUBPACKAGES):
        return  # installed wheel: the subpackages live inside natzoo/
    root = here.parent
    if not all((root / name / "__init__.py").is_file() for name in _SOURCE_SUBPACKAGES):
        return
    if not any(isinstance(f, _SourceTreeFinder) and f.root == root for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceTreeFinder(root))


_map_source_tree()


def train(cfg: Any) -> dict:
    """Trains the task named by ``cfg.task``; see :func:`natzoo.training.train`."""
    from natzoo.training import train as _train

    return _train(cfg)


def evaluate(cfg: Any) -> dict:
    """Evaluates the task named by ``cfg.task``; see :func:`natzoo.evaluation.evaluate`."""
    from natzoo.evaluation import evaluate as _evaluate

    return _evaluate(cfg)
