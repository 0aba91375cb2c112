"""The detection task's config rules (its ``config_rules``, checked with ``natzoo.config.COMMON_RULES``)."""

from __future__ import annotations

from natzoo.detection.detectors import ARCHITECTURES
from natzoo.rules import Choice, Either, Flag, Integer, ListOf, Rule, Table

__all__ = ["DETECTION_RULES"]

_COUNT = Integer(1)

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
