"""A toy model family: the one file a new family adds, as ``models/toy.py`` (plus its import line in
``models/__init__.py``). ``tests/test_new_family.py`` loads it under that module name, ``natzoo.models.toy``."""

from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


class ToyNet(nn.Module):
    """One strided convolution, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, embed_dim: int = 8, drop_path_rate: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_chans, embed_dim, 3, stride=2, padding=1)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        return self.head(self.stem(x).relu().mean((2, 3)))


default_cfgs = generate_default_cfgs({
    "toy_tiny": {"url": "", "num_classes": 1000, "input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic",
                 "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "first_conv": "stem",
                 "classifier": "head"},
})


@register_model
def toy_tiny(pretrained: bool = False, **kwargs: Any) -> ToyNet:
    """The toy family's only variant."""
    return build_model_with_cfg(ToyNet, "toy_tiny", pretrained, **kwargs)
