"""Task registry: maps a task name (the ``task`` config key) to the :class:`Task` that builds its pieces.

``natzoo.run.training.run_training`` and ``natzoo.run.evaluation.run_evaluation`` are task-agnostic drivers: they
validate the config, read ``ckpt_path`` once, compare a resumed run's config with its checkpoint
(:func:`check_resume`), build the LightningModule, LightningDataModule and extra callbacks through the task's methods,
and run Lightning. A new task (e.g. detection) subclasses :class:`Task` in its own module, registers an instance and
lists that module in ``_BUILTIN_TASKS`` (or calls :func:`register_task` before ``train``), without touching the
drivers. See docs/training.md, "Adding a task".
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

from natzoo.checkpoints import CheckpointInfo
from natzoo.rules import Rule

__all__ = ["Difference", "Task", "available_tasks", "check_resume", "get_task", "register_task", "task_of_checkpoint"]

log = logging.getLogger(__name__)


class Difference(NamedTuple):
    """One setting where a resumed run's config differs from its checkpoint's.

    Attributes:
        key: the config key (as the user writes it).
        saved: the checkpoint's value.
        current: the config's value.
        kind: ``"refused"`` (the run cannot continue with it), ``"restored"`` (the checkpoint's value comes back with
            its saved state) or ``"applied"`` (the resumed run uses the config's value).
    """

    key: str
    saved: Any
    current: Any
    kind: Literal["refused", "restored", "applied"] = "refused"


class Task:
    """A task: what the task-agnostic drivers ask of it. Subclass it, set the class attributes and override the
    builders; every builder takes the whole (resolved) OmegaConf config. The driver reads ``ckpt_path`` once and
    hands the result (a :class:`natzoo.checkpoints.CheckpointInfo`, None without one) to the methods that need it.

    Attributes:
        name: value of the ``task`` config key.
        module_class: the task's LightningModule class (its checkpoints' hyper-parameters are its arguments).
        monitor: metric ModelCheckpoint tracks for the best checkpoint, and its mode.
        config_rules: rules of the task's own config knobs (``natzoo.rules``), checked with
            ``natzoo.config.COMMON_RULES`` before :meth:`validate_config`.
        curves: the panels of ``curves.png``: title -> ``(logged metric name, label)`` pairs; titles ending in
            ``(%)`` show fractions as percent.
    """

    name: ClassVar[str]
    module_class: ClassVar[type | None] = None
    monitor: ClassVar[tuple[str, str]] = ("val/acc1", "max")
    config_rules: ClassVar[Mapping[str, Rule]] = {}
    curves: ClassVar[Mapping[str, tuple[tuple[str, str], ...]]] = {
        "loss": (("train/loss_epoch", "train loss"), ("val/loss", "val loss"))}

    def validate_config(self, cfg: Any, stage: str, ckpt: CheckpointInfo | None) -> None:
        """Raises ``ValueError``/``TypeError`` for bad values before any heavy work (no model built, no image
        decoded); ``stage`` is ``"fit"`` or ``"eval"``. It may prepare cheap things such as the demo dataset."""

    def resume_differences(self, cfg: Any, ckpt: CheckpointInfo) -> Sequence[Difference]:
        """Where the config of a run resumed from ``ckpt`` differs from the checkpoint's; the driver refuses the run
        on a ``"refused"`` one (:func:`check_resume`). The default compares nothing."""
        return ()

    def build_datamodule(self, cfg: Any, ckpt: CheckpointInfo | None) -> Any:
        """The ``LightningDataModule``."""
        raise NotImplementedError

    def build_module(self, cfg: Any, datamodule: Any) -> Any:
        """The ``LightningModule`` for training (the datamodule gives e.g. class counts); initialised from
        ``cfg.checkpoint`` when set (fine-tuning)."""
        raise NotImplementedError

    def load_module_for_eval(self, cfg: Any, datamodule: Any) -> Any:
        """The ``LightningModule`` to evaluate (from ``cfg.ckpt_path``, a weights file or a bare registry name)."""
        raise NotImplementedError

    def build_callbacks(self, cfg: Any) -> list:
        """Task-specific callbacks added to the generic ones (checkpointing, progress bar, LR monitor, curves)."""
        return []

    def before_eval(self, cfg: Any, module: Any, datamodule: Any) -> None:
        """Hook run just before evaluation (e.g. to enable a confusion matrix)."""

    def summarize_eval(self, cfg: Any, module: Any, datamodule: Any, metrics: dict[str, float],
                       output_dir: Path) -> dict:
        """The JSON-able evaluation result from the logged validation metrics (and task artefacts such as plots)."""
        return dict(metrics)

    def owns_checkpoint(self, hyper_parameters: Mapping[str, Any]) -> bool:
        """Whether a checkpoint with these hyper-parameters was written by this task's module."""
        if self.module_class is None:
            return True
        params = inspect.signature(self.module_class.__init__).parameters  # type: ignore[misc]  # a class, not an instance
        return set(hyper_parameters) <= set(params) and all(
            name in hyper_parameters for name, p in params.items()
            if name != "self" and p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD)


def check_resume(cfg: Any, ckpt: CheckpointInfo, differences: Sequence[Difference]) -> list[Difference]:
    """The driver's comparison of a resumed run's config with its checkpoint (the task lists the differences).

    Returns:
        The differences the resumed run applies; the restored ones are logged as overridden.

    Raises:
        ValueError: a refused difference (naming each key with both values).
    """
    refused = [d for d in differences if d.kind == "refused"]
    if refused:
        listed = "; ".join(f"{d.key}: checkpoint {d.saved!r}, config {d.current!r}" for d in refused)
        raise ValueError(f"ckpt_path={ckpt.path}: the config does not describe the run that wrote this checkpoint "
                         f"({listed}). Resume with the checkpoint's settings (the resume command printed by train.py "
                         "has them), or start a new run that initialises from its weights with checkpoint=<file>")
    restored = [d for d in differences if d.kind == "restored"]
    if restored:
        log.warning("ckpt_path: the optimizer state saved in the checkpoint overrides %s (restored values are used)",
                    "; ".join(f"{d.key}={d.current!r} (checkpoint: {d.saved!r})" for d in restored))
    applied = [d for d in differences if d.kind == "applied"]
    if applied:
        log.info("ckpt_path: changed from the checkpoint and applied: %s",
                 "; ".join(f"{d.key}: {d.saved!r} -> {d.current!r}" for d in applied))
    return applied


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
        raise TypeError(f"register_task expects a natzoo.run.tasks.Task instance, got {type(task).__name__}")
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
