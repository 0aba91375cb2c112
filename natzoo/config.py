"""Config helpers of the train/eval drivers: the value rules every knob is checked against before anything is built,
the `model=<variant>` configs generated from timm's registry, and small conversions.

Every numeric, boolean and choice knob the code reads has one rule here (or, for task-specific knobs, in the task's
``config_rules``). :func:`check_config` applies them to a composed config and raises ``TypeError`` (wrong type) or
``ValueError`` (out of range, unknown choice) naming the key and the value, e.g. ``optim.lr='abc': expected a number
> 0``. The LightningModules check their own ``optim``/``sched`` dictionaries against the same rules.
"""

from __future__ import annotations

import glob
import math
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "CLASSIFICATION_RULES",
    "COMMON_RULES",
    "DETECTION_RULES",
    "OPTIM_RULES",
    "SCHED_RULES",
    "Choice",
    "Either",
    "Flag",
    "Integer",
    "ListOf",
    "Number",
    "Rule",
    "Table",
    "Text",
    "Texts",
    "check_config",
    "check_settings",
    "check_weights_source",
    "find_last_checkpoint",
    "plain",
    "register_with_hydra",
    "run_dir_of_checkpoint",
]


def plain(value: Any) -> Any:
    """OmegaConf node -> plain Python containers (resolved); other values unchanged."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


class Rule:
    """A check of one config value: :meth:`problem` returns ``(exception type, what was expected)`` or None."""

    nullable: bool = False

    def expected(self) -> str:
        """Human description of the accepted values."""
        raise NotImplementedError

    def accepts_type(self, value: Any) -> bool:
        """Whether ``value`` has an acceptable type (range aside)."""
        raise NotImplementedError

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (of an acceptable type) is in range."""
        return True

    def problem(self, value: Any) -> tuple[type[Exception], str] | None:
        """None when ``value`` is valid, else the exception type and the description of the valid values."""
        if value is None:
            return None if self.nullable else (TypeError, self.describe())
        if not self.accepts_type(value):
            return TypeError, self.describe()
        if not self.accepts(value):
            return ValueError, self.describe()
        return None

    def describe(self) -> str:
        """:meth:`expected`, plus "or null" for nullable rules."""
        return self.expected() + (" or null" if self.nullable else "")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Number(Rule):
    """A real number in a range: ``low``/``high`` bounds (None: unbounded), open when ``*_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False

    def accepts_type(self, value: Any) -> bool:
        return _is_number(value)

    def accepts(self, value: Any) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def expected(self) -> str:
        return "a finite number" + self._range()


@dataclass(frozen=True)
class Integer(Number):
    """An integer in a range (bounds inclusive)."""

    def accepts_type(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def expected(self) -> str:
        return "an integer" + self._range()


@dataclass(frozen=True)
class Flag(Rule):
    """``true`` or ``false``."""

    nullable: bool = False

    def accepts_type(self, value: Any) -> bool:
        return isinstance(value, bool)

    def expected(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Choice(Rule):
    """One of fixed values (compared by type and value, so ``1`` is not ``true``)."""

    options: tuple = ()
    nullable: bool = False

    def accepts_type(self, value: Any) -> bool:
        return isinstance(value, (str, bool, int, float))

    def accepts(self, value: Any) -> bool:
        return any(type(value) is type(o) and value == o for o in self.options)

    def expected(self) -> str:
        shown = ", ".join(str(o).lower() if isinstance(o, bool) else repr(o) for o in self.options)
        return f"one of {shown}"


@dataclass(frozen=True)
class Text(Rule):
    """A non-empty string, optionally checked by ``valid`` (described by ``what``)."""

    nullable: bool = False
    valid: Callable[[str], bool] | None = None
    what: str = "a non-empty string"

    def accepts_type(self, value: Any) -> bool:
        return isinstance(value, str)

    def accepts(self, value: Any) -> bool:
        return bool(value) and (self.valid is None or self.valid(value))

    def expected(self) -> str:
        return self.what


@dataclass(frozen=True)
class ListOf(Rule):
    """A list of values each passing ``item``; ``length`` fixes the count (None: any, at least ``min_length``)."""

    item: Rule = Number()
    length: int | None = None
    min_length: int = 0
    nullable: bool = False

    def accepts_type(self, value: Any) -> bool:
        return isinstance(value, (list, tuple)) and all(self.item.accepts_type(v) for v in value)

    def accepts(self, value: Any) -> bool:
        count_ok = len(value) == self.length if self.length is not None else len(value) >= self.min_length
        return count_ok and all(self.item.accepts(v) for v in value)

    def expected(self) -> str:
        count = f"{self.length} " if self.length is not None else ""
        return f"a list of {count}values, each {self.item.expected()}"


def Texts(nullable: bool = False) -> ListOf:
    """A list of non-empty strings."""
    return ListOf(item=Text(), nullable=nullable)


@dataclass(frozen=True)
class Table(Rule):
    """A mapping (keyword arguments passed on to a library, checked there)."""

    nullable: bool = False

    def accepts_type(self, value: Any) -> bool:
        return isinstance(value, Mapping)

    def expected(self) -> str:
        return "a mapping of keyword arguments"


@dataclass(frozen=True)
class Either(Rule):
    """Any of several rules."""

    rules: tuple[Rule, ...] = ()
    nullable: bool = False

    def accepts_type(self, value: Any) -> bool:
        return any(r.accepts_type(value) for r in self.rules)

    def accepts(self, value: Any) -> bool:
        return any(r.accepts_type(value) and r.accepts(value) for r in self.rules)

    def expected(self) -> str:
        return " or ".join(r.expected() for r in self.rules)


def _precisions() -> tuple:
    try:
        from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    except ImportError:
        return ()
    return tuple(v for literal in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(literal))


def _is_timm_optimizer(name: str) -> bool:
    from timm.optim import list_optimizers

    return name.lower().split("_")[-1] in list_optimizers()


_UNIT = Number(0.0, 1.0)
_POSITIVE = Number(0.0, low_open=True)
_NON_NEGATIVE = Number(0.0)
_COUNT = Integer(1)
_PRECISION = Choice(_precisions()) if _precisions() else Either((Text(), Integer()))
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos", "random")

# Optimizer settings (configs/optim) read by natzoo.optim.configure_optimizers.
OPTIM_RULES: dict[str, Rule] = {
    "name": Text(valid=_is_timm_optimizer, what="an optimizer name of timm.optim.list_optimizers() (adamw, sgd, ...)"),
    "lr": _POSITIVE,
    "scale_lr": Flag(),
    "lr_base_batch": _COUNT,
    "weight_decay": _NON_NEGATIVE,
    "betas": ListOf(Number(0.0, 1.0, high_open=True), length=2),
    "eps": _POSITIVE,
    "momentum": Number(0.0, 1.0, high_open=True),
    "no_decay_1d": Flag(),
    "no_decay_rpb": Flag(),
    "no_decay_names": Texts(),
}

# Schedule settings (configs/sched) read by natzoo.optim.build_lr_lambda and the trainer's max_epochs.
SCHED_RULES: dict[str, Rule] = {
    "name": Choice(("cosine", "constant", "warmup_step")),
    "epochs": _COUNT,
    "cooldown_epochs": Integer(0),
    "warmup_epochs": _NON_NEGATIVE,
    "warmup_lr": _NON_NEGATIVE,
    "min_lr": _NON_NEGATIVE,
    "warmup_steps": Integer(0),
    "warmup_ratio": Number(0.0, 1.0, low_open=True),
    "milestones": ListOf(Integer(0)),
    "milestone_unit": Choice(("epoch", "step")),
    "gamma": _POSITIVE,
}

# Keys every schedule needs, by name (the configure_optimizers check).
SCHED_REQUIRED = {
    "cosine": ("epochs", "warmup_epochs", "warmup_lr", "min_lr"),
    "constant": ("epochs", "warmup_epochs", "warmup_lr", "min_lr"),
    "warmup_step": ("epochs", "warmup_steps", "warmup_ratio", "milestones", "milestone_unit", "gamma"),
}

_TRAINER_RULES: dict[str, Rule] = {
    "accelerator": Text(),
    "devices": Either((Integer(-1), Choice(("auto",)), ListOf(Integer(0), min_length=1), Text())),
    "num_nodes": _COUNT,
    "precision": _PRECISION,
    "max_epochs": Integer(1, nullable=True),
    "max_steps": Integer(-1),
    "limit_train_batches": Either((Integer(0), Number(0.0, 1.0)), nullable=True),
    "limit_val_batches": Either((Integer(0), Number(0.0, 1.0)), nullable=True),
    "gradient_clip_val": Number(0.0, nullable=True),
    "gradient_clip_algorithm": Choice(("norm", "value"), nullable=True),
    "accumulate_grad_batches": _COUNT,
    "check_val_every_n_epoch": Integer(1, nullable=True),
    "log_every_n_steps": _COUNT,
    "num_sanity_val_steps": Integer(-1),
    "deterministic": Either((Flag(), Choice(("warn",))), nullable=True),
    "benchmark": Flag(nullable=True),
    "use_distributed_sampler": Flag(),
    "enable_progress_bar": Flag(),
    "enable_model_summary": Flag(),
    "fast_dev_run": Either((Flag(), Integer(0))),
}

# Knobs of train.yaml / eval.yaml and of the shared config groups, checked for every task.
COMMON_RULES: dict[str, Rule] = {
    "task": Text(),
    "run_name": Text(),
    "seed": Integer(0, 2**32 - 1),
    "cpu_threads": Integer(1, nullable=True),
    "ckpt_path": Text(nullable=True, what="a checkpoint path or `last`"),
    "checkpoint": Text(nullable=True, what="a weights file path"),
    "nonfinite_loss": Choice(("stop", "skip")),
    "channels_last": Flag(),
    "compile": Either((Flag(), Table())),
    "use_ema": Flag(),
    "pretrained": Flag(),
    "random_weights": Flag(),
    "output": Text(nullable=True, what="a file path"),
    "ema.enabled": Flag(),
    "ema.decay": _UNIT,
    "ema.warmup": Flag(),
    "ema.evaluate": Flag(),
    "data.batch_size": _COUNT,
    "data.eval_batch_size": Integer(1, nullable=True),
    "data.num_workers": Integer(0),
    "data.pin_memory": Flag(),
    "data.persistent_workers": Flag(),
    "model.name": Text(what="a model name of timm's registry"),
    "model.kwargs": Table(),
    "model.drop_path_rate": Number(0.0, 1.0, high_open=True, nullable=True),
    "model.grad_checkpointing": Flag(),
    "optim.layer_decay": Number(0.0, 1.0, low_open=True, nullable=True),
    **{f"optim.{k}": rule for k, rule in OPTIM_RULES.items()},
    **{f"sched.{k}": rule for k, rule in SCHED_RULES.items()},
    **{f"trainer.{k}": rule for k, rule in _TRAINER_RULES.items()},
}

# Classification-only knobs (image folders, timm transforms and Mixup).
CLASSIFICATION_RULES: dict[str, Rule] = {
    "confusion_matrix": Choice(("auto", True, False)),
    "loss.name": Choice(("ce", "bce")),
    "loss.bce_target_threshold": Number(0.0, 1.0, high_open=True, nullable=True),
    "loss.bce_sum": Flag(),
    "model.freeze": Texts(),
    "data.img_size": Integer(8, nullable=True),
    "data.bad_images": Choice(("error", "skip")),
    "data.drop_last": Flag(),
    "data.aug_repeats": Integer(0),
    "data.mean": ListOf(_UNIT, length=3, nullable=True),
    "data.std": ListOf(_POSITIVE, length=3, nullable=True),
    "data.train_split": Text(),
    "data.val_split": Text(),
    "data.num_classes": Integer(1, nullable=True),
    "data.train_samples": Integer(1, nullable=True),
    "data.val_samples": Integer(1, nullable=True),
    "data.shuffle_buffer": Integer(1, nullable=True),
    "data.seed": Integer(0),
    "data.image_key": Text(),
    "data.label_key": Text(),
    "data.cache_dir": Text(nullable=True, what="a folder path"),
    "data.generate.train_per_class": _COUNT,
    "data.generate.val_per_class": _COUNT,
    "data.generate.img_size": Integer(8),
    "data.generate.seed": Integer(0),
    "data.train_transform.scale": ListOf(Number(0.0, 1.0, low_open=True), length=2),
    "data.train_transform.ratio": ListOf(_POSITIVE, length=2),
    "data.train_transform.hflip": _UNIT,
    "data.train_transform.vflip": _UNIT,
    "data.train_transform.color_jitter": Either((_NON_NEGATIVE, ListOf(_NON_NEGATIVE)), nullable=True),
    "data.train_transform.auto_augment": Text(nullable=True, what="a timm auto-augment string"),
    "data.train_transform.interpolation": Choice(_INTERPOLATIONS),
    "data.train_transform.re_prob": _UNIT,
    "data.train_transform.re_mode": Choice(("const", "rand", "pixel")),
    "data.train_transform.re_count": _COUNT,
    "data.eval_transform.crop_pct": Number(0.0, 1.0, low_open=True, nullable=True),
    "data.eval_transform.crop_mode": Choice(("center", "squash", "border"), nullable=True),
    "data.eval_transform.interpolation": Choice(_INTERPOLATIONS[:-1], nullable=True),
    "data.mixup.mixup_alpha": _NON_NEGATIVE,
    "data.mixup.cutmix_alpha": _NON_NEGATIVE,
    "data.mixup.cutmix_minmax": ListOf(_UNIT, length=2, nullable=True),
    "data.mixup.prob": _UNIT,
    "data.mixup.switch_prob": _UNIT,
    "data.mixup.mode": Choice(("batch", "pair", "elem")),
    "data.mixup.label_smoothing": Number(0.0, 1.0, high_open=True),
}

# Detection-only knobs (torchvision detectors on a NAT-family backbone, COCO-format data).
DETECTION_RULES: dict[str, Rule] = {
    "model.arch": Choice(("fasterrcnn", "maskrcnn")),
    "model.out_indices": ListOf(Integer(0, 3), min_length=1),
    "model.frozen_stages": Integer(-1, 5),
    "model.norm_eval": Flag(),
    "model.fpn_channels": _COUNT,
    "model.min_size": Either((_COUNT, ListOf(_COUNT, min_length=1))),
    "model.max_size": _COUNT,
    "model.anchor_sizes": ListOf(_COUNT, min_length=1, nullable=True),
    "model.representation_size": _COUNT,
    "model.mask_head_channels": _COUNT,
    "model.detector_kwargs": Table(),
    "data.with_masks": Flag(nullable=True),
    "data.filter_empty": Flag(),
}

_MISSING = object()


def _raise(key: str, value: Any, problem: tuple[type[Exception], str]) -> None:
    kind, expected = problem
    raise kind(f"{key}={value!r}: expected {expected}")


def check_config(cfg: DictConfig, rules: Mapping[str, Rule]) -> None:
    """Checks every key of ``rules`` that ``cfg`` holds (keys it lacks are not used by that config).

    Raises:
        TypeError: a value has the wrong type (the message names the key, the value and what was expected).
        ValueError: a value is out of range or not one of the choices.
    """
    for key, rule in rules.items():
        try:
            value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
        except OmegaConfBaseException as err:  # an unset mandatory value (???) or a failing interpolation
            raise ValueError(f"{key}: {err}") from None
        if value is _MISSING:
            continue
        value = plain(value)
        problem = rule.problem(value)
        if problem is not None:
            _raise(key, value, problem)


def check_settings(values: Mapping[str, Any], rules: Mapping[str, Rule], prefix: str,
                   required: Sequence[str] = ()) -> None:
    """Checks a settings dictionary (e.g. a module's ``optim``) against ``rules``; ``required`` keys must be present.

    Raises:
        ValueError: a required key is missing, or a value is out of range.
        TypeError: a value has the wrong type.
    """
    for key, value in values.items():
        rule = rules.get(key)
        problem = rule.problem(plain(value)) if rule is not None else None
        if problem is not None:
            _raise(f"{prefix}.{key}", value, problem)
    missing = [k for k in required if k not in values]
    if missing:
        raise ValueError(f"{prefix} settings lack {[f'{prefix}.{k}' for k in missing]} (see configs/{prefix})")


_WEIGHT_SOURCES = ("ckpt_path", "checkpoint", "pretrained")


def check_weights_source(cfg: DictConfig) -> None:
    """Evaluation needs weights: refuses to score a randomly initialised model unless ``random_weights=true`` asks
    for exactly that.

    Raises:
        ValueError: no source of weights is given (the message lists them), or ``random_weights=true`` comes with one.
    """
    given = [key for key in _WEIGHT_SOURCES if cfg.get(key)]
    if cfg.get("random_weights"):
        if given:
            raise ValueError(f"random_weights=true contradicts {given[0]}={cfg.get(given[0])!r}: pass one or the other")
        return
    if not given:
        raise ValueError(
            "no weights to evaluate: pass ckpt_path=<run dir>/checkpoints/best.ckpt (a checkpoint of train.py), "
            "checkpoint=<file> with model=<name> (official .pth, HF .bin/.safetensors or a plain state dict), or "
            "pretrained=true with model=<name> (timm's pretrained weights); random_weights=true evaluates a randomly "
            "initialised model (a chance-level baseline)"
        )


def find_last_checkpoint(search_root: str | os.PathLike) -> Path | None:
    """Newest ``last*.ckpt`` under ``search_root/**/checkpoints/`` (by modification time), or None."""
    pattern = os.path.join(glob.escape(str(search_root)), "**", "checkpoints", "last*.ckpt")
    found = [Path(p) for p in glob.glob(pattern, recursive=True)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_dir_of_checkpoint(ckpt_path: str | None, resume_dir: str) -> Path | None:
    """The run directory a resumed run continues in: for ``ckpt_path=last`` or a path, the run that wrote the
    checkpoint (``<run dir>/checkpoints/<file>``, with Hydra's ``.hydra`` record); None for a fresh run or a
    checkpoint from elsewhere."""
    if not ckpt_path:
        return None
    path = find_last_checkpoint(resume_dir) if str(ckpt_path) == "last" else Path(str(ckpt_path))
    if path is None or path.parent.name != "checkpoints" or not (path.parent.parent / ".hydra").is_dir():
        return None
    return path.parent.parent.resolve()


def _run_dir(ckpt_path: str | None, resume_dir: str, fresh_dir: str) -> str:
    found = run_dir_of_checkpoint(ckpt_path, resume_dir)
    return str(found) if found is not None else fresh_dir


def _output_subdir(ckpt_path: str | None, resume_dir: str, timestamp: str) -> str:
    # A resumed run keeps the first part's Hydra record and writes its own next to it.
    return ".hydra" if run_dir_of_checkpoint(ckpt_path, resume_dir) is None else f".hydra/resumed_{timestamp}"


def register_with_hydra() -> None:
    """Registers natzoo's additions to Hydra; call before Hydra composes (``train.py``/``eval.py`` do so on import).

    * One ``model=<variant>`` config per registered NAT-family variant in Hydra's ConfigStore: each is
      ``configs/model/timm.yaml`` with ``name: <variant>``, so the architecture and its defaults (drop path, ...)
      come from the registered variant and the config overrides only what the user changes.
    * The resolvers ``natzoo_run_dir`` and ``natzoo_output_subdir`` of ``configs/hydra/train.yaml``: a run resumed
      with ``ckpt_path=`` continues in the run directory that wrote the checkpoint.
    """
    from hydra.core.config_store import ConfigStore

    from natzoo.models import registered_models

    store = ConfigStore.instance()
    for name in registered_models():
        store.store(group="model", name=name, node={"defaults": ["timm"], "name": name})
    for name, function in (("natzoo_run_dir", _run_dir), ("natzoo_output_subdir", _output_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
