"""``train(cfg)``: the task-agnostic training driver behind ``train.py``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.imports import RequirementCache
from omegaconf import DictConfig, OmegaConf, open_dict

from natzoo.callbacks import CurvePlot, RNGState
from natzoo.checkpoint_io import AtomicCheckpointIO
from natzoo.config import COMMON_RULES, check_config, find_last_checkpoint
from natzoo.lightning_checkpoints import read_lightning_checkpoint
from natzoo.tasks import Task, get_task, task_of_checkpoint

__all__ = ["build_callbacks", "build_loggers", "build_trainer", "check_task_config", "resolve_ckpt_path", "train"]

log = logging.getLogger(__name__)

_TENSORBOARD = RequirementCache("tensorboard") or RequirementCache("tensorboardX")


def check_task_config(cfg: DictConfig, stage: str) -> Task:
    """The task named by ``cfg.task`` after every value rule (common and the task's) and the task's own checks passed;
    ``stage`` is ``"fit"`` or ``"eval"``. Nothing heavy has run when this raises."""
    task = get_task(str(cfg.get("task", "classification")))
    check_config(cfg, {**COMMON_RULES, **task.config_rules})
    task.validate_config(cfg, stage)
    return task


def resolve_ckpt_path(cfg: DictConfig, task: Task | None = None) -> str | None:
    """``ckpt_path``: None, a file, or ``last`` (newest ``last.ckpt`` of an earlier run of ``paths.resume_dir``).

    The file is read once (weights-only, memory-mapped) to check that it is a Lightning checkpoint of ``task``.

    Raises:
        ValueError: ``last`` finds no checkpoint, or the file is missing, empty, a directory, not a Lightning
            checkpoint, or one of another task (the message names the file and what was expected).
    """
    value = cfg.get("ckpt_path")
    if value in (None, ""):
        return None
    path = str(value)
    if path == "last":
        search = Path(str(cfg.paths.resume_dir))
        found = find_last_checkpoint(search)
        if found is None:
            raise ValueError(f"ckpt_path=last: no checkpoints/last.ckpt under {search}; nothing to resume (start a run "
                             "without ckpt_path, or pass ckpt_path=/path/to/last.ckpt)")
        path = str(found)
    checkpoint = read_lightning_checkpoint(path)
    if task is not None and not task.owns_checkpoint(checkpoint.get("hyper_parameters") or {}):
        owner = task_of_checkpoint(checkpoint.get("hyper_parameters") or {})
        hint = f"; it is a {owner} checkpoint: add task={owner}" if owner else ""
        raise ValueError(f"ckpt_path={path!r} was not written by the {task.name} task's module{hint}")
    return path


def build_callbacks(cfg: DictConfig, task: Task) -> list[pl.Callback]:
    """Callbacks from ``cfg.callbacks`` (each a ``_target_`` entry; null entries dropped), the task's own, the curve
    plot and the RNG-state checkpointing. ``callbacks.model_checkpoint.monitor: null`` means the task's metric."""
    callbacks: list[pl.Callback] = []
    for name, spec in (cfg.get("callbacks") or {}).items():
        if spec is None or "_target_" not in spec:
            continue
        if name == "model_checkpoint" and spec.get("monitor", None) is None:
            with open_dict(spec):
                spec.monitor, spec.mode = task.monitor
        callbacks.append(instantiate(spec))
    callbacks.extend(task.build_callbacks(cfg))
    callbacks.append(CurvePlot(str(Path(cfg.paths.output_dir) / "curves.png"), title=str(cfg.get("run_name", ""))))
    callbacks.append(RNGState())
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    """Loggers from ``cfg.logger``; TensorBoard entries are dropped (with a note) when tensorboard is not installed."""
    loggers = []
    for name, spec in (cfg.get("logger") or {}).items():
        if spec is None or "_target_" not in spec:
            continue
        if "TensorBoard" in spec._target_ and not _TENSORBOARD:
            rank_zero_info(f"logger.{name}: tensorboard is not installed, skipped (pip install tensorboard)")
            continue
        loggers.append(instantiate(spec))
    return loggers


def build_trainer(cfg: DictConfig, callbacks: list, loggers: Any, **overrides: Any) -> pl.Trainer:
    """``lightning.pytorch.Trainer`` from ``cfg.trainer`` with the atomic checkpoint IO plugin.

    ``trainer.max_epochs: null`` means ``sched.epochs + sched.cooldown_epochs`` when a schedule is configured (a
    ``trainer.max_steps`` limit then ends training earlier, as usual in Lightning).
    """
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    sched = cfg.get("sched")
    if trainer_cfg.get("max_epochs") is None and sched:
        trainer_cfg["max_epochs"] = int(sched.epochs) + int(sched.get("cooldown_epochs", 0) or 0)
    plugins = list(trainer_cfg.pop("plugins", None) or [])
    strategy = trainer_cfg.get("strategy")
    if not (isinstance(strategy, dict) and "FSDP" in str(strategy.get("_target_", ""))):
        plugins.append(AtomicCheckpointIO())
    trainer_cfg.update(overrides)
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers, plugins=plugins or None,
                       _convert_="object")


def _metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Trains ``cfg.task`` as configured and returns paths and final metrics.

    Order: config checks (fail fast), seeding, data module, module, callbacks/loggers, Trainer, ``fit``. Resumes
    from ``cfg.ckpt_path`` (a file or ``last``). Returns ``output_dir``, ``best_checkpoint``, ``last_checkpoint``,
    ``best_score``, ``metrics`` (last logged values) and ``curves`` (PNG path).
    """
    task = check_task_config(cfg, "fit")
    ckpt_path = resolve_ckpt_path(cfg, task)
    if ckpt_path is not None:
        with open_dict(cfg):
            cfg.ckpt_path = ckpt_path
        rank_zero_info(f"Resuming from {ckpt_path}")
    output_dir = Path(str(cfg.paths.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)

    datamodule = task.build_datamodule(cfg)
    module = task.build_module(cfg, datamodule)
    callbacks = build_callbacks(cfg, task)
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, callbacks, loggers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    checkpoint_cb = trainer.checkpoint_callback
    best = getattr(checkpoint_cb, "best_model_path", "") or None
    last = next((cb.best_model_path or cb.last_model_path for cb in trainer.checkpoint_callbacks
                 if getattr(cb, "filename", None) == "last"), None) or getattr(checkpoint_cb, "last_model_path", None)
    score = getattr(checkpoint_cb, "best_model_score", None)
    result = {
        "output_dir": str(output_dir),
        "best_checkpoint": best,
        "last_checkpoint": last,
        "best_score": float(score) if score is not None else None,
        "monitor": getattr(checkpoint_cb, "monitor", None),
        "metrics": _metrics(trainer),
        "curves": str(output_dir / "curves.png"),
        "interrupted": trainer.interrupted,
    }
    if trainer.is_global_zero:
        _print_summary(result, output_dir, cfg)
    return result


def _print_summary(result: dict[str, Any], output_dir: Path, cfg: DictConfig) -> None:
    metrics = result["metrics"]
    monitor = result["monitor"]
    lines = [""]
    if monitor and result["best_score"] is not None:
        scale = 100.0 if "acc" in monitor else 1.0
        unit = "%" if scale == 100.0 else ""
        line = f"Best {monitor}: {scale * result['best_score']:.2f}{unit}"
        if monitor in metrics:
            line += f" (last epoch: {scale * metrics[monitor]:.2f}{unit})"
        lines.append(line)
    ckpt = result["best_checkpoint"] or result["last_checkpoint"]
    eval_cmd = f"python eval.py ckpt_path={ckpt}" + _data_override(cfg) if ckpt else "(no checkpoint was written)"
    lines.append(
        f"Done. Outputs in {output_dir}: checkpoints/ (best: {result['best_checkpoint']}, last: "
        f"{result['last_checkpoint']}), metrics.csv, curves.png, .hydra/config.yaml. Evaluate with: {eval_cmd}"
    )
    print("\n".join(lines), flush=True)


def _data_override(cfg: DictConfig) -> str:
    choice = None
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choice = HydraConfig.get().runtime.choices.get("data")
    except (ImportError, ValueError):
        choice = None
    parts = [] if cfg.get("task", "classification") == "classification" else [f"task={cfg.task}"]
    if choice and choice != "demo":
        parts.append(f"data={choice}")
    if choice != "demo":
        parts.append(f"data.root={cfg.data.root}")
    return (" " + " ".join(parts)) if parts else ""
