"""Image classification task: LightningModule, builders and evaluation summary."""

from natzoo.classification.module import ClassificationModule

__all__ = ["ClassificationModule"]
