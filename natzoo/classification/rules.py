"""The classification task's config rules (its ``config_rules``, checked with ``natzoo.config.COMMON_RULES``) and the
choices of its training loss and of its handling of a non-finite loss."""

from __future__ import annotations

import enum

from natzoo.datasets.folder import BAD_IMAGE_POLICIES
from natzoo.rules import Choice, Either, Flag, Integer, ListOf, Number, Rule, Table, Text, Texts

__all__ = ["CLASSIFICATION_RULES", "LossName", "NonfiniteLoss"]


class LossName(str, enum.Enum):
    """``loss.name``: the training loss."""

    CE = "ce"  # cross-entropy (soft-target cross-entropy under mixup)
    BCE = "bce"  # timm's BinaryCrossEntropy: one sigmoid per class


class NonfiniteLoss(str, enum.Enum):
    """``nonfinite_loss``: what a NaN/Inf training loss does."""

    STOP = "stop"  # raise, naming the step
    SKIP = "skip"  # skip the step and count it (single device only)


_UNIT = Number(0.0, 1.0)
_POSITIVE = Number(0.0, low_open=True)
_NON_NEGATIVE = Number(0.0)
_COUNT = Integer(1)
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos", "random")

# Classification-only knobs (image folders, timm transforms and Mixup).
CLASSIFICATION_RULES: dict[str, Rule] = {
    "confusion_matrix": Choice(("auto", True, False)),
    "nonfinite_loss": Choice(tuple(policy.value for policy in NonfiniteLoss)),
    "loss.name": Choice(tuple(name.value for name in LossName)),
    "loss.bce_target_threshold": Number(0.0, 1.0, low_open=True, high_open=True, nullable=True),  # 0: every target 1
    "loss.bce_sum": Flag(),
    "model.freeze": Texts(),
    "model.pretrained": Flag(),
    "model.pretrained_cfg_overlay": Table(),
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
