"""``train(cfg)``: the task-agnostic training driver behind ``train.py``."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import shlex
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from natzoo.checkpoints import AtomicCheckpointIO, CheckpointInfo, find_last_checkpoint, resolve_ckpt_path
from natzoo.config import COMMON_RULES, check_weights_source
from natzoo.rules import check_config
from natzoo.run.callbacks import CurvePlot, EpochSummary, ModelSummary, RNGState
from natzoo.run.console import command, configure_console
from natzoo.run.hydra_setup import compose_before_overrides, config_file
from natzoo.run.loggers import check_logger_packages, drop_rows_after
from natzoo.run.rundir import RunDirectoryBusy, RunDirLock, discard_unused, release_other_claims
from natzoo.run.tasks import Task, check_resume, get_task, task_of_checkpoint
from natzoo.strategies import enable_grad_checkpointing

__all__ = [
    "SIGTERM_EXIT_CODE",
    "build_callbacks",
    "build_loggers",
    "build_trainer",
    "check_added_keys",
    "check_run_config",
    "cpu_threads",
    "run_training",
]

log = logging.getLogger(__name__)

# Exit status of a run stopped by SIGTERM (128 + the signal number, the shell's convention).
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


def _is_rank_zero() -> bool:
    """Whether this process is global rank zero (Lightning sets ``rank_zero_only.rank`` when it starts)."""
    return getattr(rank_zero_only, "rank", 0) == 0


def check_run_config(cfg: DictConfig, stage: str) -> tuple[Task, CheckpointInfo | None]:
    """Every check of a run's config, in order, before anything is built; ``stage`` is ``"fit"`` or ``"eval"``.

    The value rules (common and the task's), the loggers' packages, the source of weights (evaluation), the
    ``ckpt_path`` file (resolved and read once; ``cfg.ckpt_path`` becomes the file for ``last``), the task's own checks
    (which may prepare cheap things such as the demo dataset), then, for a resumed run, the comparison of the config
    with the checkpoint's (:func:`natzoo.run.tasks.check_resume` on the task's differences).

    Returns:
        The task and the resolved checkpoint (None without one).

    Raises:
        ValueError, TypeError: a check failed; the exception carries ``natzoo_config_error = True`` so that
            ``train.py``/``eval.py`` print its message without a traceback.
    """
    try:
        task = get_task(str(cfg.get("task", "classification")))
        overrides = _command_line_overrides()
        check_added_keys(overrides, {**COMMON_RULES, **task.config_rules}, stage, _keys_before_force_adds(overrides))
        check_config(cfg, {**COMMON_RULES, **task.config_rules})
        check_logger_packages(cfg.get("logger"))
        if stage == "eval":
            check_weights_source(cfg)
            _check_output_file(cfg.get("output"))
        _check_accelerator(cfg)
        resolved = _checkpoint_of(cfg, task)
        if resolved is not None:
            with open_dict(cfg):
                cfg.ckpt_path = resolved.path
        task.validate_config(cfg, stage, resolved)
        if stage == "fit" and resolved is not None:
            check_resume(cfg, resolved, task.resume_differences(cfg, resolved))
    except (ValueError, TypeError) as err:
        setattr(err, "natzoo_config_error", True)  # noqa: B010  (read by natzoo.run.console.exit_on_config_error)
        raise
    return task, resolved


# Tables whose entries are handed on as they are (a library's keyword arguments, `_target_` entries), so a key added
# to them with `+` is read: Lightning's Trainer, the model's constructor, callbacks, loggers, torch.compile, the data
# module's arguments (which refuse an unknown one by name), Hydra's own settings.
_OPEN_TABLES = ("trainer.", "model.kwargs.", "model.detector_kwargs.", "callbacks.", "logger.", "compile.", "data.",
                "hydra.")
# Knobs of one stage only: added to the other stage's config, nothing reads them.
_EVAL_ONLY = ("pretrained", "random_weights", "output", "use_ema", "confusion_matrix")
_FIT_ONLY = ("optim.", "sched.", "ema.", "loss.", "nonfinite_loss", "callbacks.", "logger.", "data.mixup.",
             "data.train_transform.", "data.aug_repeats", "checkpoint")


def check_added_keys(overrides: list[str], rules: dict[str, Any], stage: str,
                     existing: Callable[[str], bool] | None = None) -> None:
    """Refuses a command-line ``+key=value`` that adds a key no code of this stage reads (``+pretrained=true`` in
    training trained from random weights without a word). Hydra only lets ``+`` add a key the config lacks, so such a
    key is read only when it is an optional knob of this stage (a rule) or an entry of a table handed on as it is.
    ``++key=value`` (add or override) sets a key the config has, which is accepted, or adds one, which is checked like
    ``+key`` (``++optim.lrr=1`` is refused).

    Args:
        overrides: the command line's overrides.
        rules: the value rules of this stage's config (its optional knobs).
        stage: ``"fit"`` or ``"eval"``.
        existing: whether a key is in the config composed without the command line's ``++`` overrides (None: every
            ``++key`` is checked like ``+key``).

    Raises:
        ValueError: naming the override and where the settings are described.
    """
    for override in overrides:
        if not override.startswith("+"):
            continue  # `key=value` sets a key the config has; `~key` deletes one
        key = _override_key(override)
        problem = _unread_key_problem(override, key, rules, stage)
        if problem is not None and not (override.startswith("++") and existing is not None and existing(key)):
            raise ValueError(problem)


def _unread_key_problem(override: str, key: str, rules: dict[str, Any], stage: str) -> str | None:
    """Why nothing would read ``key`` added by ``override`` in this stage; None when something does."""
    program = "train.py" if stage == "fit" else "eval.py"
    other_stage = _EVAL_ONLY if stage == "fit" else _FIT_ONLY
    if any(key == k.rstrip(".") or key.startswith(k) for k in other_stage):
        return (f"{override}: {program} does not use {key!r} (it is a setting of "
                f"{'eval.py' if stage == 'fit' else 'train.py'}), so it would be ignored"
                + (": to start training from published or saved weights, pass checkpoint=<file>"
                   if key == "pretrained" else ""))
    if key.startswith("trainer.") and key.count(".") == 1 and key[len("trainer."):] not in _trainer_arguments():
        return (f"{override}: Lightning's Trainer has no argument {key[len('trainer.'):]!r} (the trainer config's "
                "keys are Trainer arguments)")
    if key in rules or key.startswith(_OPEN_TABLES):
        return None
    return (f"{override}: no setting {key!r} exists in {program}'s config, so nothing would read it (a misspelt or "
            f"unsupported key); the settings are those of configs/{'train' if stage == 'fit' else 'eval'}.yaml and "
            f"its groups (python {program} --cfg job prints them all)")


def _keys_before_force_adds(overrides: list[str]) -> Callable[[str], bool]:
    """Whether a key is in the config this command composes without its ``++`` overrides (composed once, when first
    asked: :func:`natzoo.run.hydra_setup.compose_before_overrides`); outside a Hydra run no key is. When that
    composition fails (an override that needs a ``++`` one), every key counts as present: ``++`` is then not checked,
    as before round four."""
    composed: list[Any] = []

    def existing(key: str) -> bool:
        if not composed:
            try:
                cfg = compose_before_overrides([o for o in overrides if o.startswith("++")])
            except Exception as err:  # noqa: BLE001  (Hydra's composition errors have no common base)
                log.debug("the config without the ++ overrides cannot be composed (%s); ++ keys are not checked", err)
                composed.append(None)
            else:
                composed.append(OmegaConf.to_container(cfg, resolve=False) if cfg is not None else {})
        if composed[0] is None:
            return True
        node: Any = composed[0]
        for part in key.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return False
        return True

    return existing


# Lightning's loggers and the package each needs (TensorBoard is dropped with a note when missing: build_loggers).
def _check_accelerator(cfg: DictConfig) -> None:
    """``trainer.accelerator=gpu`` (or ``cuda``) on a machine without a visible CUDA GPU is refused before anything is
    built (Lightning refused it when the Trainer was made, after the data and the model)."""
    accelerator = str((cfg.get("trainer") or {}).get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={accelerator!r} but no CUDA GPU is visible to PyTorch (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}): use trainer=cpu, or check "
                         "CUDA_VISIBLE_DEVICES and the driver")


def _trainer_arguments() -> set[str]:
    return set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


def _check_no_earlier_run(output_dir: Path) -> None:
    """A fresh training run refuses a run directory that holds another run's results (``hydra.run.dir`` given again):
    the two would share one ``metrics.csv`` and overwrite each other's checkpoints."""
    found = [name for name in ("metrics.csv", "checkpoints") if (output_dir / name).exists()]
    if found:
        error = ValueError(f"the run directory {output_dir} already holds another run's {' and '.join(found)}: a new "
                           "run there would mix its metrics with that run's and replace its checkpoints. Continue that "
                           f"run with ckpt_path={output_dir / 'checkpoints' / 'last.ckpt'}, or start this one in a "
                           "new directory (leave hydra.run.dir out: every run gets its own)")
        setattr(error, "natzoo_config_error", True)  # noqa: B010
        raise error


def _check_output_file(output: Any) -> None:
    """``output`` (the evaluation's JSON file) must not be a folder, and its folder must be creatable."""
    if not output:
        return
    path = Path(str(output))
    if path.is_dir():
        raise ValueError(f"output={str(output)!r} is a folder; give the JSON file to write, e.g. "
                         f"output={str(path / 'eval.json')!r}")
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"output={str(output)!r}: {existing} is a file, not a folder")


def _checkpoint_of(cfg: DictConfig, task: Task) -> CheckpointInfo | None:
    """``cfg.ckpt_path`` (None, a file, or ``last`` under ``paths.resume_dir``) resolved and read once
    (:func:`natzoo.checkpoints.resolve_ckpt_path`), and checked to be a checkpoint of ``task``.

    Raises:
        ValueError: ``last`` finds no checkpoint, or the file is missing, empty, a directory, not a Lightning
            checkpoint, or one of another task (the message names the file and what was expected).
    """
    resume_dir = cfg.get("paths", {}).get("resume_dir")
    info = resolve_ckpt_path(cfg.get("ckpt_path"), str(resume_dir) if resume_dir else None)
    if info is not None and str(cfg.get("ckpt_path")) == "last" and "seed" in cfg:
        _check_last_is_this_seeds(info.path, int(cfg.seed), resume_dir)  # which run `last` found, before its kind
    if info is not None and not task.owns_checkpoint(info.hyper_parameters):
        owner = task_of_checkpoint(info.hyper_parameters)
        hint = f"; it is a {owner} checkpoint: add task={owner}" if owner else ""
        raise ValueError(f"ckpt_path={info.path!r} was not written by the {task.name} task's module{hint}")
    return info


def _run_seed(checkpoint: Path) -> int | None:
    """The seed recorded in Hydra's record of the run that wrote ``checkpoint`` (None when there is none)."""
    record = checkpoint.parent.parent / ".hydra" / "config.yaml"
    try:
        loaded = OmegaConf.load(record)
        seed = loaded.get("seed") if isinstance(loaded, DictConfig) else None
    except Exception:  # a missing, unreadable or unparsable record (YAML errors) proves nothing: no seed
        return None
    return seed if isinstance(seed, int) else None


def _check_last_is_this_seeds(path: str, seed: int, resume_dir: Any) -> None:
    """``ckpt_path=last`` takes the newest ``last.ckpt`` of the run name, whichever seed wrote it: refused when its
    run had another seed than this command (it would continue another seed's run under this seed's name)."""
    found = _run_seed(Path(path))
    if found is None or found == seed:
        return
    same = sorted((p for p in Path(str(resume_dir)).glob("**/checkpoints/last*.ckpt") if _run_seed(p) == seed),
                  key=lambda p: p.stat().st_mtime)
    hint = f"ckpt_path={same[-1]} continues this seed's newest run" if same else "no run of this seed has a last.ckpt"
    raise ValueError(f"ckpt_path=last found {path}, written by a run with seed={found}, but this command has "
                     f"seed={seed}: pass seed={found} to continue that run; {hint}")


def build_callbacks(cfg: DictConfig, task: Task) -> list[pl.Callback]:
    """Callbacks from ``cfg.callbacks`` (each a ``_target_`` entry; null entries, and entries whose factory returns
    None such as the progress bar off a terminal, dropped), the task's own, the curve plot, the per-epoch line and
    ``summary.csv``, and the RNG-state checkpointing. ``callbacks.model_checkpoint.monitor: null`` means the task's
    metric."""
    callbacks: list[pl.Callback] = []
    for name, spec in (cfg.get("callbacks") or {}).items():
        if spec is None or "_target_" not in spec:
            continue
        if name == "model_checkpoint" and spec.get("monitor", None) is None:
            with open_dict(spec):
                spec.monitor, spec.mode = task.monitor
        callback = instantiate(spec)
        if callback is not None:
            callbacks.append(callback)
    callbacks.extend(task.build_callbacks(cfg))
    callbacks.append(CurvePlot(str(Path(cfg.paths.output_dir) / "curves.png"), task.curves,
                               title=str(cfg.get("run_name", ""))))
    callbacks.append(EpochSummary(str(Path(cfg.paths.output_dir) / "summary.csv")))
    callbacks.append(RNGState())
    summary = cfg.get("trainer", {}).get("enable_model_summary", True)
    if summary is not False and not any(isinstance(cb, pl.callbacks.ModelSummary) for cb in callbacks):
        callbacks.append(ModelSummary())  # Lightning's default, without its "0 Total Flops" line
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    """Loggers from ``cfg.logger`` (their packages were checked by :func:`check_run_config`)."""
    return [instantiate(spec) for spec in (cfg.get("logger") or {}).values() if spec is not None and "_target_" in spec]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: Any, **overrides: Any) -> pl.Trainer:
    """``lightning.pytorch.Trainer`` from ``cfg.trainer`` with the atomic checkpoint IO plugin.

    ``trainer.max_epochs: null`` means ``sched.epochs + sched.cooldown_epochs`` when a schedule is configured (a
    ``trainer.max_steps`` limit then ends training earlier, as usual in Lightning). The progress bar is the one among
    ``callbacks`` (none: no bar, where Lightning would add its own; ``trainer.enable_progress_bar=false`` removes it
    too), and a model summary among ``callbacks`` is the only one (Lightning neither adds its default nor says so).
    """
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_cfg, dict)  # cfg.trainer is a DictConfig, so its container is a dict
    if trainer_cfg.get("enable_progress_bar", True) is False:
        callbacks = [cb for cb in callbacks if not isinstance(cb, pl.callbacks.ProgressBar)]
    trainer_cfg["enable_progress_bar"] = any(isinstance(cb, pl.callbacks.ProgressBar) for cb in callbacks)
    if any(isinstance(cb, pl.callbacks.ModelSummary) for cb in callbacks):
        trainer_cfg["enable_model_summary"] = False
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


def _hydra_output_subdir() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().output_subdir if HydraConfig.initialized() else None


@contextlib.contextmanager
def run_directory(cfg: DictConfig, stage: str, lock: bool) -> Iterator[tuple[Task, CheckpointInfo | None, Path]]:
    """Checks the config (:func:`check_run_config`), then holds the run directory for the run.

    A run that fails a check leaves nothing behind (:func:`natzoo.run.rundir.discard_unused`); with ``lock`` the global
    rank zero holds the directory's lock (:class:`natzoo.run.rundir.RunDirLock`), so a second run into the same
    directory is refused before anything is written.

    Yields:
        The task, the resolved checkpoint and the run directory.
    """
    output_dir = Path(str(cfg.paths.output_dir))
    if _is_rank_zero():
        release_other_claims(output_dir)  # claims Hydra made before the command line's overrides were applied
    holder = RunDirLock(output_dir) if lock and _is_rank_zero() else None
    try:
        task, info = check_run_config(cfg, stage)
        if holder is not None:
            try:
                holder.acquire()
            except RunDirectoryBusy as err:
                setattr(err, "natzoo_config_error", True)  # noqa: B010
                raise
        if stage == "fit" and info is None:
            _check_no_earlier_run(output_dir)
    except BaseException:
        if _is_rank_zero():
            discard_unused(output_dir, _hydra_output_subdir())
        raise
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        yield task, info, output_dir
    except BaseException:
        # A run that failed before it wrote any result (data, model or trainer construction; a missing logger
        # package) leaves no empty run directory behind: only Hydra's record and the lock file go, nothing else.
        if _is_rank_zero():
            discard_unused(output_dir, _hydra_output_subdir())  # under the lock, released below
        raise
    finally:
        if holder is not None:
            holder.release()


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Trains ``cfg.task`` as configured and returns paths and final metrics.

    Order: config checks (fail fast, leaving nothing behind), the run directory's lock (one writer), seeding, data
    module, module, callbacks/loggers, Trainer, ``fit``. Resumes from ``cfg.ckpt_path`` (a file or ``last``); under
    ``train.py`` a resumed run continues in the run directory that wrote the checkpoint (``configs/hydra/train.yaml``).
    Returns ``output_dir``, ``best_checkpoint``, ``last_checkpoint``, ``best_score``, ``metrics`` (last logged values)
    and ``curves`` (PNG path). A run stopped by Ctrl-C or SIGTERM prints the command that resumes it and exits with a
    non-zero status (1 for Ctrl-C, as Lightning does; :data:`SIGTERM_EXIT_CODE` for SIGTERM); a run stopped by an
    error says so and raises it.

    Raises:
        natzoo.run.rundir.RunDirectoryBusy: another run is writing into the same run directory.
    """
    configure_console()
    with run_directory(cfg, "fit", lock=True) as (task, info, output_dir):
        resuming_here = False
        if info is not None:
            resuming_here = _prepare_resume(info, output_dir)
        with cpu_threads(cfg):
            return _fit(cfg, task, info, output_dir, resuming_here)


def _fit(cfg: DictConfig, task: Task, info: CheckpointInfo | None, output_dir: Path,
         resuming_here: bool) -> dict[str, Any]:
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    ckpt_path = info.path if info is not None else None

    try:
        datamodule = task.build_datamodule(cfg, info)
        module = task.build_module(cfg, datamodule)
    except (ValueError, TypeError) as err:
        # argument checks of the data module and the model (`model.kwargs.embed_dim=-8`, a `model.freeze` name no
        # parameter has): the message names the key, so it is printed as a config error, without a traceback
        setattr(err, "natzoo_config_error", True)  # noqa: B010
        raise
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
    except SIGTERMException:
        # Lightning stops at the end of the step on SIGTERM with SystemExit(): status 0, as if training had finished.
        if trainer.is_global_zero:
            _print_resume_hint(output_dir, "Stopped by SIGTERM")
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    except (KeyboardInterrupt, SystemExit):
        # Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown.
        if trainer.is_global_zero:
            _print_resume_hint(output_dir, "Interrupted")
        raise
    except BaseException:
        # Lightning marks every exception as an interruption (trainer.interrupted); this one is an error.
        if trainer.is_global_zero:
            _print_resume_hint(output_dir, "Training stopped by an error")
        raise

    if trainer.global_step == 0 and trainer.max_steps != 0 and trainer.limit_train_batches != 0 \
            and (trainer.max_epochs is None or trainer.max_epochs > 0):
        # An empty or unreadable stream (a WebDataset shard without samples) ends fit after 0 steps "successfully".
        raise RuntimeError(f"training ran 0 optimizer steps: the training data yielded no batch (data.root="
                           f"{cfg.data.get('root')!r}, data.train_split={cfg.data.get('train_split')!r}); check that "
                           "the training split holds samples natzoo can read")

    checkpoint_cb = trainer.checkpoint_callback
    best = getattr(checkpoint_cb, "best_model_path", "") or None
    last = next((getattr(cb, "best_model_path", "") or getattr(cb, "last_model_path", "")
                 for cb in trainer.checkpoint_callbacks
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


def _prepare_resume(info: CheckpointInfo, output_dir: Path) -> bool:
    """Notes where the run continues; in the checkpoint's own run directory, drops the metrics rows the resumed run
    logs again (those after the checkpoint). Returns whether the run continues in that directory."""
    same_dir = Path(info.path).resolve().parent.parent == output_dir.resolve()
    where = "in its run directory" if same_dir else f"in a new run directory {output_dir}"
    rank_zero_info(f"Resuming from {info.path} (epoch {info.epoch} done, step {info.global_step}) {where}")
    if same_dir and _is_rank_zero():
        dropped = drop_rows_after(output_dir / "metrics.csv", info.global_step)
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


def _print_resume_hint(output_dir: Path, what: str) -> None:
    last = find_last_checkpoint(output_dir)
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
    lines.append(f"Done. Outputs in {output_dir}: {', '.join(written + ['metrics.csv', 'summary.csv', 'curves.png'])}")
    if ckpt:
        lines.append(" ".join(["Evaluate with:", *command("eval"), *_eval_overrides(cfg),
                               _shell_override("ckpt_path", ckpt)]))
    print("\n".join(lines), flush=True)


def _eval_overrides(cfg: DictConfig) -> list[str]:
    """``eval.py`` overrides that reproduce this run's task, data and model settings (eval.yaml's defaults:
    classification, demo): the data config and its root always, and every ``data``/``model`` override of the
    command line (the weights come from the checkpoint; eval.py checks that the model settings agree with it)."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    words = [] if cfg.get("task", "classification") == "classification" else [f"task={cfg.task}"]
    choice = choices.get("data")
    if choice and choice != "demo":
        words.append(f"data={choice}")
    if cfg.data.get("root") is not None:
        words.append(_shell_override("data.root", cfg.data.root))
    chosen = [o for o in _command_line_overrides(("data.root", "data")) if _override_key(o).split(".")[0]
              in ("data", "model")]
    given = {_override_key(o) for o in chosen}
    preset = [_shell_override(key, value) for key, value in _generator_changes(cfg, choice or "demo")
              if key not in given]
    return words + preset + [_shell_word(o) for o in chosen]


def _generator_changes(cfg: DictConfig, choice: str) -> list[tuple[str, Any]]:
    """``data.generate.*`` values of a generated dataset that differ from its data config's own (``configs/data/
    <choice>.yaml``), e.g. set by ``debug=tiny``, which eval.yaml lacks: without them evaluation would generate and
    score another dataset (and replace the one the run used). The data config is the file the run's config search
    path found (a user's ``--config-dir`` folder first), the one the evaluation command composes too."""
    generate = cfg.data.get("generate")
    file = config_file(f"data/{choice}.yaml")
    if not generate or file is None:
        return []
    loaded = OmegaConf.load(file)
    defaults = (loaded.get("generate") if isinstance(loaded, DictConfig) else None) or {}
    return [(f"data.generate.{key}", value) for key, value in generate.items()
            if key in defaults and defaults[key] != value]
