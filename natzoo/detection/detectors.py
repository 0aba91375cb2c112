"""torchvision Faster R-CNN / Mask R-CNN with a NAT-family backbone and torchvision's FPN."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from natzoo.detection.backbone import NATBackbone

__all__ = ["ARCHITECTURES", "NATBackboneWithFPN", "build_detector"]

ARCHITECTURES = ("fasterrcnn", "maskrcnn")


class NATBackboneWithFPN(nn.Module):
    """NAT-family backbone followed by torchvision's FPN, laid out like torchvision's ``BackboneWithFPN``.

    The trunk is ``body`` (so its keys are ``body.patch_embed.*``, ``body.levels.*``, ``body.norm{i}.*``) and the
    pyramid is ``fpn``. Outputs are named ``"0"..."n-1"`` (strides 4, 8, 16, 32 for the default outputs) plus
    ``"pool"``, a stride-64 max-pooled copy of the last level (mmdet's ``num_outs=5`` without extra convs).

    Args:
        body: The backbone.
        out_channels: FPN channels (256 in the official configs).
    """

    def __init__(self, body: NATBackbone, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels_list, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    @property
    def featmap_names(self) -> list[str]:
        """Names of the FPN levels fed to RoI pooling (all but ``"pool"``)."""
        return [str(i) for i in range(len(self.body.out_indices))]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = OrderedDict((str(i), f) for i, f in enumerate(self.body(x)))
        return self.fpn(features)


def build_detector(
    arch: str,
    backbone: str,
    num_classes: int,
    *,
    fpn_channels: int = 256,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[int] | None = None,
    representation_size: int = 1024,
    mask_head_channels: int = 256,
    detector_kwargs: dict[str, Any] | None = None,
    **backbone_kwargs: Any,
) -> FasterRCNN:
    """Builds a torchvision Faster R-CNN or Mask R-CNN on a NAT / DiNAT / DiNAT_s backbone with an FPN.

    The detector's transform normalises with ImageNet mean/std, resizes each image so its short side is
    ``min_size`` (a random choice of the tuple during training; the last entry in evaluation) with the long side
    at most ``max_size``, and pads the batch to a multiple of 32.

    Args:
        arch: ``"fasterrcnn"`` or ``"maskrcnn"``.
        backbone: Registry name of a hierarchical NAT-family variant, e.g. ``"dinat_tiny"``.
        num_classes: Foreground classes + 1 (torchvision counts the background as class 0).
        fpn_channels: FPN width.
        min_size: Short side(s) for the detector's resize.
        max_size: Long-side limit for the resize.
        anchor_sizes: One anchor size per FPN level including ``"pool"`` (default 32, 64, ..., scaled to the number
            of levels); three aspect ratios 0.5, 1, 2 each.
        representation_size: Width of the two-FC box head (1024 as in mmdet's ``Shared2FCBBoxHead``).
        mask_head_channels: Width of the four mask-head convs (256 as in mmdet's ``FCNMaskHead``).
        detector_kwargs: Extra keyword arguments of torchvision's ``FasterRCNN``/``MaskRCNN`` (RPN/RoI settings).
        **backbone_kwargs: :class:`NATBackbone` arguments (``out_indices``, ``frozen_stages``, ``norm_eval``,
            ``dilations``, ``drop_path_rate``, ``pretrained``, model overrides such as ``embed_dim``).

    Returns:
        The detector (``model.backbone.body`` is the :class:`NATBackbone`).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not supported; choose one of {list(ARCHITECTURES)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (foreground classes + background), got {num_classes!r}")
    body = NATBackbone(backbone, **backbone_kwargs)
    neck = NATBackboneWithFPN(body, fpn_channels)
    names = neck.featmap_names
    num_levels = len(names) + 1
    if anchor_sizes is None:
        anchor_sizes = [32 * 2**i for i in range(num_levels)]
    if len(anchor_sizes) != num_levels:
        raise ValueError(f"anchor_sizes needs {num_levels} entries (one per FPN level incl. 'pool'), got "
                         f"{anchor_sizes}")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * num_levels)
    box_pool = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
    kwargs = {
        "num_classes": None,
        "min_size": tuple(min_size) if isinstance(min_size, Sequence) else int(min_size),
        "max_size": int(max_size),
        "rpn_anchor_generator": anchors,
        "box_roi_pool": box_pool,
        "box_head": TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        "box_predictor": FastRCNNPredictor(representation_size, num_classes),
    }
    kwargs.update(detector_kwargs or {})
    if arch == "fasterrcnn":
        return FasterRCNN(neck, **kwargs)
    mask_pool = MultiScaleRoIAlign(featmap_names=names, output_size=14, sampling_ratio=2)
    mask_head = MaskRCNNHeads(fpn_channels, (mask_head_channels,) * 4, 1)
    mask_predictor = MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes)
    return MaskRCNN(neck, mask_roi_pool=mask_pool, mask_head=mask_head, mask_predictor=mask_predictor, **kwargs)
