"""``train(cfg)``: the task-agnostic training driver behind ``train.py``."""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.imports import RequirementCache
from omegaconf import DictConfig, OmegaConf, open_dict

from natzoo.callbacks import CurvePlot, RNGState
from natzoo.checkpoints import AtomicCheckpointIO, read_lightning_checkpoint
from natzoo.cli import command
from natzoo.config import COMMON_RULES, check_config, check_weights_source, find_last_checkpoint
from natzoo.console import configure_console
from natzoo.loggers import drop_rows_after
from natzoo.strategies import enable_grad_checkpointing
from natzoo.tasks import Task, get_task, task_of_checkpoint

__all__ = [
    "build_callbacks",
    "build_loggers",
    "build_trainer",
    "check_run_config",
    "cpu_threads",
    "resolve_ckpt_path",
    "train",
]

log = logging.getLogger(__name__)

_TENSORBOARD = RequirementCache("tensorboard") or RequirementCache("tensorboardX")


def check_run_config(cfg: DictConfig, stage: str) -> tuple[Task, str | None]:
    """Every check of a run's config, in order, before anything is built; ``stage`` is ``"fit"`` or ``"eval"``.

    The value rules (common and the task's), the source of weights (evaluation), the ``ckpt_path`` file (resolved
    and read; ``cfg.ckpt_path`` becomes the file for ``last``), then the task's own checks (which may prepare cheap
    things such as the demo dataset).

    Returns:
        The task and the resolved ``ckpt_path`` (None without one).
    """
    task = get_task(str(cfg.get("task", "classification")))
    check_config(cfg, {**COMMON_RULES, **task.config_rules})
    if stage == "eval":
        check_weights_source(cfg)
    ckpt_path = resolve_ckpt_path(cfg, task)
    if ckpt_path is not None:
        with open_dict(cfg):
            cfg.ckpt_path = ckpt_path
    task.validate_config(cfg, stage)
    return task, ckpt_path


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
    callbacks.append(CurvePlot(str(Path(cfg.paths.output_dir) / "curves.png"), task.curves,
                               title=str(cfg.get("run_name", ""))))
    callbacks.append(RNGState())
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    """Loggers from ``cfg.logger``; TensorBoard entries are dropped (with a note) when tensorboard is not installed."""
    loggers = []
    for name, spec in (cfg.get("logger") or {}).items():
        if spec is None or "_target_" not in spec:
            continue
        if "TensorBoard" in spec._target_ and not _TENSORBOARD:
            rank_zero_info(f"logger.{name}: TensorBoard logging is off (tensorboard is not installed; "
                           "pip install tensorboard turns it on); metrics go to metrics.csv")
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


@contextlib.contextmanager
def cpu_threads(cfg: DictConfig) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``cfg.cpu_threads`` while the run computes on the CPU (``null``: PyTorch's
    default, one thread per physical core), restored afterwards. One thread per process holds up when other
    processes compete for the cores, where the default collapses; see docs/training.md, "CPU threads"."""
    threads = cfg.get("cpu_threads")
    accelerator = str(cfg.get("trainer", {}).get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    before = torch.get_num_threads()
    if threads is not None and on_cpu:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Trains ``cfg.task`` as configured and returns paths and final metrics.

    Order: config checks (fail fast), seeding, data module, module, callbacks/loggers, Trainer, ``fit``. Resumes
    from ``cfg.ckpt_path`` (a file or ``last``); under ``train.py`` a resumed run continues in the run directory that
    wrote the checkpoint (``configs/hydra/train.yaml``). Returns ``output_dir``, ``best_checkpoint``,
    ``last_checkpoint``, ``best_score``, ``metrics`` (last logged values) and ``curves`` (PNG path). An interrupted
    run (Ctrl-C) prints the command that resumes it.
    """
    configure_console()
    task, ckpt_path = check_run_config(cfg, "fit")
    output_dir = Path(str(cfg.paths.output_dir))
    resuming_here = False
    if ckpt_path is not None:
        resuming_here = _prepare_resume(ckpt_path, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with cpu_threads(cfg):
        return _fit(cfg, task, ckpt_path, output_dir, resuming_here)


def _fit(cfg: DictConfig, task: Task, ckpt_path: str | None, output_dir: Path, resuming_here: bool) -> dict[str, Any]:
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)

    datamodule = task.build_datamodule(cfg)
    module = task.build_module(cfg, datamodule)
    if cfg.get("model", {}).get("grad_checkpointing"):
        rank_zero_info(f"gradient checkpointing on in {', '.join(enable_grad_checkpointing(module))}")
    callbacks = build_callbacks(cfg, task)
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, callbacks, loggers)
    try:
        with warnings.catch_warnings():
            if resuming_here:  # continuing the run whose checkpoints these are, not the mix-up Lightning warns about
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty",
                                        module=r"lightning\.pytorch\.callbacks\.model_checkpoint")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except BaseException:
        if trainer.is_global_zero:
            _print_resume_hint(output_dir, interrupted=trainer.interrupted)
        raise

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


def _prepare_resume(ckpt_path: str, output_dir: Path) -> bool:
    """Notes where the run continues; in the checkpoint's own run directory, drops the metrics rows the resumed run
    logs again (those after the checkpoint). Returns whether the run continues in that directory."""
    checkpoint = read_lightning_checkpoint(ckpt_path)
    epoch, step = int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0))
    same_dir = Path(ckpt_path).resolve().parent.parent == output_dir.resolve()
    where = "in its run directory" if same_dir else f"in a new run directory {output_dir}"
    rank_zero_info(f"Resuming from {ckpt_path} (after epoch {epoch + 1}, step {step}) {where}")
    if same_dir and rank_zero_only.rank == 0:
        dropped = drop_rows_after(output_dir / "metrics.csv", step)
        if dropped:
            rank_zero_info(f"metrics.csv: {dropped} row(s) logged after that checkpoint are logged again by this run")
    return same_dir


def _shell_override(key: str, value: Any) -> str:
    """``key=value`` as one shell word that Hydra parses back to ``value`` (Hydra quoting where the path needs it)."""
    text = str(value)
    if not re.fullmatch(r"[A-Za-z0-9_./+\-]+", text):
        escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text).replace("${", "\\${")
        text = "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"
    return _shell_word(f"{key}={text}")


def _shell_word(text: str) -> str:
    """``text`` as one shell word: as it is when safe, in double quotes when that needs no escapes, else
    ``shlex.quote``."""
    if shlex.quote(text) == text or re.search(r'["$`\\!]', text):
        return shlex.quote(text)
    return f'"{text}"'


def _command_line_overrides(exclude: tuple[str, ...] = ()) -> list[str]:
    """The overrides this ``train.py`` run was started with (empty outside Hydra), minus keys in ``exclude``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if _override_key(o) not in exclude]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _print_resume_hint(output_dir: Path, interrupted: bool) -> None:
    last = find_last_checkpoint(output_dir)
    what = "Interrupted" if interrupted else "Training stopped by an error"
    if last is None:
        print(f"\n{what}: no checkpoint was written yet (last.ckpt is written at the end of every epoch), so there is "
              "nothing to resume; run the same command again to start over.", flush=True)
        return
    words = [*command("train"), *map(_shell_word, _command_line_overrides(("ckpt_path",))),
             _shell_override("ckpt_path", last)]
    print(f"\n{what}. Resume from {last} (the end of its epoch; the work since then is redone) with:\n  "
          + " ".join(words), flush=True)


def _print_summary(result: dict[str, Any], output_dir: Path, cfg: DictConfig) -> None:
    metrics = result["metrics"]
    monitor = result["monitor"]
    lines = [""]
    if monitor and result["best_score"] is not None:
        scale = 100.0 if "acc" in monitor or "mAP" in monitor else 1.0
        unit = "%" if scale == 100.0 else ""
        line = f"Best {monitor}: {scale * result['best_score']:.2f}{unit}"
        if monitor in metrics:
            line += f" (last epoch: {scale * metrics[monitor]:.2f}{unit})"
        lines.append(line)
    ckpt = result["best_checkpoint"] or result["last_checkpoint"]
    written = [str(Path(p).relative_to(output_dir)) if Path(p).is_relative_to(output_dir) else str(p)
               for p in dict.fromkeys([result["best_checkpoint"], result["last_checkpoint"]]) if p]
    lines.append(f"Done. Outputs in {output_dir}: {', '.join(written + ['metrics.csv', 'curves.png'])}")
    if ckpt:
        lines.append(" ".join(["Evaluate with:", *command("eval"), *_eval_overrides(cfg),
                               _shell_override("ckpt_path", ckpt)]))
    print("\n".join(lines), flush=True)


def _eval_overrides(cfg: DictConfig) -> list[str]:
    """``eval.py`` overrides that select this run's task and data (eval.yaml's defaults: classification, demo)."""
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get("data") if HydraConfig.initialized() else None
    words = [] if cfg.get("task", "classification") == "classification" else [f"task={cfg.task}"]
    if choice and choice != "demo":
        words.append(f"data={choice}")
    if choice != "demo":
        words.append(_shell_override("data.root", cfg.data.root))
    data_overrides = [o for o in _command_line_overrides(("data.root",)) if _override_key(o).startswith("data.")]
    return words + [_shell_word(o) for o in data_overrides]
