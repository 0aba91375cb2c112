"""Detection with NAT-family backbones: torchvision Faster/Mask R-CNN + FPN, Lightning task (the COCO-format data is
in :mod:`natzoo.datasets.coco`)."""

from natzoo.detection.backbone import NATBackbone, coco_dilations, load_backbone_checkpoint
from natzoo.detection.detectors import NATBackboneWithFPN, build_detector

__all__ = ["NATBackbone", "NATBackboneWithFPN", "build_detector", "coco_dilations", "load_backbone_checkpoint"]
