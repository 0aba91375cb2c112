"""The value rules every knob of the train/eval drivers is checked against before anything is built, the check of the
weights an evaluation uses, and the look-up of a ``ckpt_path`` run directory.

Every numeric, boolean and choice knob the code reads has one rule: here, in the module that owns the knob
(``natzoo.optim`` for ``optim``/``sched``), or, for task-specific knobs, in the task's ``config_rules``. Choice lists
are imported from the code that owns the choices (``natzoo.optim.SCHEDULES``, ``natzoo.detection.detectors
.ARCHITECTURES``, ...), never restated. :func:`check_config` applies them to a composed config and raises
``TypeError`` (wrong type) or ``ValueError`` (out of range, unknown choice) naming the key and the value, e.g.
``optim.lr='abc': expected a number > 0``. The rule vocabulary is :mod:`natzoo.rules`; the Hydra registration is
:mod:`natzoo.run.hydra_setup`.
"""

from __future__ import annotations

import os
import typing

from omegaconf import DictConfig

from natzoo.datasets.folder import BAD_IMAGE_POLICIES
from natzoo.detection.detectors import ARCHITECTURES
from natzoo.optim import OPTIM_RULES, SCHED_REQUIRED, SCHED_RULES
from natzoo.rules import (
    Choice,
    Either,
    Flag,
    Integer,
    ListOf,
    Number,
    Rule,
    Table,
    Text,
    Texts,
    check_config,
    check_settings,
    plain,
)

__all__ = [
    "CLASSIFICATION_RULES",
    "COMMON_RULES",
    "DETECTION_RULES",
    "OPTIM_RULES",
    "SCHED_REQUIRED",
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
    "plain",
]


def _precisions() -> tuple:
    try:
        from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
    except ImportError:
        return ()
    return tuple(v for literal in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(literal))


_UNIT = Number(0.0, 1.0)
_POSITIVE = Number(0.0, low_open=True)
_NON_NEGATIVE = Number(0.0)
_COUNT = Integer(1)
# More threads than cores only adds contention; far more fails later with an unrelated out-of-memory error.
_MAX_CPU_THREADS = max(os.cpu_count() or 1, 256)
_PRECISION = Choice(_precisions()) if _precisions() else Either((Text(), Integer()))
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos", "random")

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
    "cpu_threads": Integer(1, _MAX_CPU_THREADS, nullable=True),
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
    "data.bad_images": Choice(BAD_IMAGE_POLICIES),
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
    "model.arch": Choice(ARCHITECTURES),
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


