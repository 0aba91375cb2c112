"""Task registry: maps a task name (the ``task`` config key) to the functions that build its pieces.

`natzoo.run.training.run_training` and `natzoo.run.evaluation.run_evaluation` are task-agnostic drivers: they validate the config, build
the LightningModule, LightningDataModule and extra callbacks through the task's builders, and run Lightning. A new
task (e.g. detection) registers a :class:`Task` in its own module and lists that module in ``_BUILTIN_TASKS`` (or
calls :func:`register_task` before ``train``), without touching the drivers. See docs/training.md, "Adding a task".
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Task", "available_tasks", "get_task", "register_task", "task_of_checkpoint"]


@dataclass(frozen=True)
class Task:
    """The builders of one task. Every builder takes the whole (resolved) OmegaConf config.

    Attributes:
        name: value of the ``task`` config key.
        validate_config: ``(cfg, stage)`` with ``stage`` ``"fit"`` or ``"eval"``; raises ``ValueError``/``TypeError``
            for bad values before any heavy work (no model construction, no image decoded). It may prepare cheap
            things such as the generated demo dataset.
        build_datamodule: returns a ``LightningDataModule``.
        build_module: ``(cfg, datamodule) -> LightningModule`` for training (the datamodule gives e.g. class counts);
            initialises from ``cfg.checkpoint`` when set (fine-tuning).
        load_module_for_eval: ``(cfg, datamodule) -> LightningModule`` for evaluation (from a Lightning checkpoint, an
            official weights file or a bare registry name).
        build_callbacks: ``cfg -> list`` of task-specific callbacks added to the generic ones (checkpointing,
            progress bar, learning-rate monitor, curve plot).
        monitor: metric name ModelCheckpoint tracks for the best checkpoint, and its mode.
        summarize_eval: ``(cfg, module, datamodule, metrics, output_dir) -> dict`` turns the logged validation
            metrics into the JSON-able evaluation result (and writes task-specific artefacts such as plots); None
            writes the metrics as they are.
        before_eval: ``(cfg, module, datamodule) -> None`` hook run just before evaluation (e.g. to enable a
            confusion matrix).
        module_class: the task's LightningModule class (its checkpoints' hyper-parameters are its arguments).
        config_rules: rules of the task's own config knobs (``natzoo.config``), checked with the common ones before
            ``validate_config``.
        curves: the panels of ``curves.png``: title -> ``(logged metric name, label)`` pairs; titles ending in
            ``(%)`` show fractions as percent.
    """

    name: str
    validate_config: Callable[[Any, str], None]
    build_datamodule: Callable[[Any], Any]
    build_module: Callable[[Any, Any], Any]
    load_module_for_eval: Callable[[Any, Any], Any]
    build_callbacks: Callable[[Any], list] = field(default=lambda cfg: [])
    monitor: tuple[str, str] = ("val/acc1", "max")
    summarize_eval: Callable[..., dict] | None = None
    before_eval: Callable[[Any, Any, Any], None] | None = None
    module_class: type | None = None
    config_rules: Mapping[str, Any] = field(default_factory=dict)
    curves: Mapping[str, tuple[tuple[str, str], ...]] = field(
        default_factory=lambda: {"loss": (("train/loss_epoch", "train loss"), ("val/loss", "val loss"))})

    def owns_checkpoint(self, hyper_parameters: Mapping[str, Any]) -> bool:
        """Whether a checkpoint with these hyper-parameters was written by this task's module."""
        if self.module_class is None:
            return True
        params = inspect.signature(self.module_class.__init__).parameters  # type: ignore[misc]  # a class, not an instance
        return set(hyper_parameters) <= set(params) and all(
            name in hyper_parameters for name, p in params.items()
            if name != "self" and p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD)


_REGISTRY: dict[str, Task] = {}

# Modules that register a built-in task on import; imported lazily so that a task's dependencies (pycocotools, ...)
# are only needed when that task runs.
_BUILTIN_TASKS = {
    "classification": "natzoo.classification.task",
    "detection": "natzoo.detection.task",
}


def register_task(task: Task) -> Task:
    """Adds ``task`` to the registry (replacing a task of the same name) and returns it."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a natzoo.run.tasks.Task, got {type(task).__name__}")
    _REGISTRY[task.name] = task
    return task


def available_tasks() -> list[str]:
    """Names of the registered and built-in tasks."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_TASKS))


def get_task(name: str) -> Task:
    """Returns the task registered under ``name``, importing its built-in module on first use.

    Raises:
        ValueError: ``name`` is not a known task.
    """
    if name not in _REGISTRY and name in _BUILTIN_TASKS:
        importlib.import_module(_BUILTIN_TASKS[name])
    if name not in _REGISTRY:
        raise ValueError(f"task={name!r} is not a known task; choose one of {available_tasks()}")
    return _REGISTRY[name]


def task_of_checkpoint(hyper_parameters: Mapping[str, Any]) -> str | None:
    """Name of the task whose module wrote a checkpoint with these hyper-parameters (built-in tasks are imported)."""
    for name in available_tasks():
        task = get_task(name)
        if task.module_class is not None and task.owns_checkpoint(hyper_parameters):
            return name
    return None
