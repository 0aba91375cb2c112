"""Detection with NAT-family backbones: torchvision Faster/Mask R-CNN + FPN, COCO data, Lightning task."""

from natzoo.detection.backbone import NATBackbone, coco_dilations, load_backbone_checkpoint
from natzoo.detection.detectors import NATBackboneWithFPN, build_detector

__all__ = ["NATBackbone", "NATBackboneWithFPN", "build_detector", "coco_dilations", "load_backbone_checkpoint"]
