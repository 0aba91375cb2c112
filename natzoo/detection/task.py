"""Registers the ``detection`` task (``train.py``/``eval.py`` with ``task=detection``; see docs/detection.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from natzoo.checkpoints import CheckpointInfo, network_weights
from natzoo.datasets.coco import CocoDataModule
from natzoo.datasets.coco_shapes import SyntheticCocoSpec
from natzoo.detection.backbone import NATBackbone, load_backbone_checkpoint, model_family
from natzoo.detection.module import DetectionModule
from natzoo.detection.rules import DETECTION_RULES
from natzoo.models import load_weights
from natzoo.rules import plain
from natzoo.run.tasks import Difference, Task, register_task

__all__ = ["DetectionTask", "build_datamodule", "build_module", "load_module_for_eval", "resume_differences",
           "summarize_eval", "validate_config"]

log = logging.getLogger(__name__)

# Keys of cfg.model that are not build_detector arguments (``name`` becomes ``backbone``, ``kwargs`` the backbone
# overrides), and keys of cfg.data that are not CocoDataModule arguments.
_NOT_DETECTOR_ARGS = ("name", "kwargs", "grad_checkpointing")
_NOT_DATAMODULE_ARGS = ("name", "root")
_DATA_PATHS = ("train_images", "train_annotations", "val_images", "val_annotations")


def _with_masks(cfg: DictConfig) -> bool:
    data_masks = cfg.data.get("with_masks")
    return cfg.model.get("arch") == "maskrcnn" if data_masks is None else bool(data_masks)


def validate_config(cfg: DictConfig, stage: str, ckpt: CheckpointInfo | None = None) -> None:
    """Fails fast on bad detection settings (no model is built and no image decoded). The value rules have been
    checked already."""
    if not (stage == "eval" and cfg.get("ckpt_path")):
        model_family(str(cfg.model.name))
    checkpoint = cfg.get("checkpoint")
    if checkpoint and not Path(str(checkpoint)).is_file():
        raise ValueError(f"checkpoint={str(checkpoint)!r} does not exist or is not a file")
    if stage == "eval" and cfg.get("pretrained"):
        raise ValueError("pretrained=true is not available for task=detection; give ckpt_path= (a Lightning .ckpt) or "
                         "checkpoint= (detector weights)")
    if cfg.model.get("arch") == "maskrcnn" and cfg.data.get("with_masks") is False and stage == "fit":
        raise ValueError("model.arch=maskrcnn trains on masks: data.with_masks must not be false")
    data = cfg.data
    if data.get("synthetic"):
        SyntheticCocoSpec(**plain(data.synthetic))
        return
    unset = [key for key in _DATA_PATHS if not data.get(key)]
    if unset:
        raise ValueError(f"data.{unset[0]} is not set (COCO layout: data.root=/path/to/coco with train2017/, val2017/ "
                         f"and annotations/instances_*.json, or set {[f'data.{k}' for k in _DATA_PATHS]})")
    for key in _DATA_PATHS:
        path = Path(str(data[key]))
        if stage == "eval" and key.startswith("train"):
            continue
        exists = path.is_file() if key.endswith("annotations") else path.is_dir()
        if not exists:
            raise ValueError(f"data.{key}={str(path)!r} does not exist")


def resume_differences(cfg: DictConfig, ckpt: CheckpointInfo) -> list[Difference]:
    """A resumed run's backbone, detector architecture and mask head must be the checkpoint's (refused otherwise)."""
    saved = ckpt.hyper_parameters.get("detector") or {}
    if not isinstance(saved, dict):
        return []
    pairs = [("model.name", saved.get("backbone"), str(cfg.model.name)),
             ("model.arch", saved.get("arch"), cfg.model.get("arch"))]
    if ckpt.hyper_parameters.get("with_masks") is not None:
        pairs.append(("mask head (model.arch, data.with_masks)", ckpt.hyper_parameters["with_masks"], _with_masks(cfg)))
    return [Difference(key, old, new) for key, old, new in pairs if old is not None and old != new]


def build_datamodule(cfg: DictConfig, ckpt: CheckpointInfo | None = None) -> CocoDataModule:
    """COCO-format data module from ``cfg.data`` (its ``_target_``; the shapes demo when ``data.synthetic`` is set)."""
    data = plain(cfg.data)
    for key in _NOT_DATAMODULE_ARGS:
        data.pop(key, None)
    data["with_masks"] = _with_masks(cfg)
    datamodule = instantiate(data, _convert_="all")
    # The class count is needed to build the model, before the Trainer calls prepare_data/setup.
    datamodule.prepare_data()
    datamodule.setup("validate")
    return datamodule


def detector_config(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """``build_detector`` keyword arguments from ``cfg.model`` (``num_classes`` = foreground classes + 1); keys left
    null keep ``build_detector``'s defaults."""
    model = plain(cfg.model)
    config = {k: v for k, v in model.items() if k not in _NOT_DETECTOR_ARGS and v is not None}
    config.update(model.get("kwargs") or {})
    config["backbone"] = model["name"]
    config["num_classes"] = num_classes + 1
    return config


def build_module(cfg: DictConfig, datamodule: CocoDataModule) -> DetectionModule:
    """New detector for the dataset's classes; ``cfg.checkpoint`` initialises the backbone from classification
    weights (official ``.pth``, HF, or this project's classification ``.ckpt``)."""
    module = DetectionModule(
        detector_config(cfg, datamodule.num_classes), optim=plain(cfg.get("optim")), sched=plain(cfg.get("sched")),
        with_masks=_with_masks(cfg),
    )
    if cfg.get("checkpoint"):
        # nn.Module.__getattr__ types submodules as Tensor | Module
        body: NATBackbone = module.model.backbone.body  # type: ignore[assignment, union-attr]
        result = load_backbone_checkpoint(body, network_weights(str(cfg.checkpoint)), source=str(cfg.checkpoint))
        log.info("backbone initialised from %s (missing %s, unexpected %s)", cfg.checkpoint, result.missing_keys,
                 result.unexpected_keys)
    return module


def load_module_for_eval(cfg: DictConfig, datamodule: CocoDataModule) -> DetectionModule:
    """A Lightning checkpoint (``ckpt_path``; the detector is rebuilt from its hyper-parameters), or ``model`` with
    detector weights from ``checkpoint`` (a state dict of this project's detector)."""
    if cfg.get("ckpt_path"):
        module = DetectionModule.load_from_checkpoint(str(cfg.ckpt_path), map_location="cpu", weights_only=True)
        # Lightning's hparams is an AttributeDict (typed as a plain mapping)
        trained = module.hparams.detector["num_classes"] - 1  # type: ignore[attr-defined]
        if trained != datamodule.num_classes:
            raise ValueError(f"ckpt_path {cfg.ckpt_path} was trained for {trained} classes but the evaluation "
                             f"annotations have {datamodule.num_classes}")
        if module.with_masks and not datamodule.with_masks:
            # A Mask R-CNN checkpoint evaluated with a data config that did not ask for masks: load them.
            datamodule.with_masks, datamodule.val_set = True, None
            datamodule.setup("validate")
        return module
    module = DetectionModule(detector_config(cfg, datamodule.num_classes), with_masks=_with_masks(cfg))
    if not cfg.get("checkpoint"):
        return module  # random_weights=true (the evaluation driver refuses otherwise)
    load_weights(module.model, network_weights(str(cfg.checkpoint)), head="strict", source=str(cfg.checkpoint))
    return module


def summarize_eval(cfg: DictConfig, module: DetectionModule, datamodule: CocoDataModule, metrics: dict[str, float],
                   output_dir: Path) -> dict[str, Any]:
    """Box (and mask) COCO mAP in percent, plus all logged metrics."""
    result: dict[str, Any] = {"bbox_mAP": 100.0 * metrics["val/bbox_mAP"],
                              "bbox_mAP_50": 100.0 * metrics["val/bbox_mAP_50"]}
    if "val/segm_mAP" in metrics:
        result["segm_mAP"] = 100.0 * metrics["val/segm_mAP"]
        result["segm_mAP_50"] = 100.0 * metrics["val/segm_mAP_50"]
    result["num_classes"] = datamodule.num_classes
    result["metrics"] = metrics
    return result


class DetectionTask(Task):
    """Object detection / instance segmentation with a NAT-family backbone (``task=detection``)."""

    name = "detection"
    module_class = DetectionModule
    monitor = ("val/bbox_mAP", "max")
    config_rules = DETECTION_RULES
    curves = {
        "loss": (("train/loss_epoch", "train loss (sum)"),),
        "mAP (%)": (("val/bbox_mAP", "box mAP"), ("val/bbox_mAP_50", "box mAP@50"), ("val/segm_mAP", "mask mAP"),
                    ("val/segm_mAP_50", "mask mAP@50")),
    }

    def validate_config(self, cfg: Any, stage: str, ckpt: CheckpointInfo | None) -> None:
        """See :func:`validate_config`."""
        validate_config(cfg, stage, ckpt)

    def resume_differences(self, cfg: Any, ckpt: CheckpointInfo) -> list[Difference]:
        """See :func:`resume_differences`."""
        return resume_differences(cfg, ckpt)

    def build_datamodule(self, cfg: Any, ckpt: CheckpointInfo | None) -> CocoDataModule:
        """See :func:`build_datamodule`."""
        return build_datamodule(cfg, ckpt)

    def build_module(self, cfg: Any, datamodule: Any) -> DetectionModule:
        """See :func:`build_module`."""
        return build_module(cfg, datamodule)

    def load_module_for_eval(self, cfg: Any, datamodule: Any) -> DetectionModule:
        """See :func:`load_module_for_eval`."""
        return load_module_for_eval(cfg, datamodule)

    def summarize_eval(self, cfg: Any, module: Any, datamodule: Any, metrics: dict[str, float],
                       output_dir: Path) -> dict:
        """See :func:`summarize_eval`."""
        return summarize_eval(cfg, module, datamodule, metrics, output_dir)


TASK = register_task(DetectionTask())
