"""Registers the ``detection`` task (``train.py``/``eval.py`` with ``task=detection``; see docs/detection.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from natzoo.checkpoints import network_weights, resolve_ckpt_path
from natzoo.config import DETECTION_RULES, plain
from natzoo.datasets.coco import CocoDataModule
from natzoo.datasets.coco_shapes import SyntheticCocoSpec
from natzoo.detection.backbone import NATBackbone, load_backbone_checkpoint, model_family
from natzoo.detection.module import DetectionModule
from natzoo.models import load_weights
from natzoo.run.tasks import Task, register_task

__all__ = ["build_datamodule", "build_module", "load_module_for_eval", "summarize_eval", "validate_config"]

log = logging.getLogger(__name__)

# Keys of cfg.model that are not build_detector arguments (``name`` becomes ``backbone``, ``kwargs`` the backbone
# overrides), and keys of cfg.data that are not CocoDataModule arguments.
_NOT_DETECTOR_ARGS = ("name", "kwargs", "grad_checkpointing")
_NOT_DATAMODULE_ARGS = ("name", "root")
_DATA_PATHS = ("train_images", "train_annotations", "val_images", "val_annotations")


def _with_masks(cfg: DictConfig) -> bool:
    data_masks = cfg.data.get("with_masks")
    return cfg.model.get("arch") == "maskrcnn" if data_masks is None else bool(data_masks)


def validate_config(cfg: DictConfig, stage: str) -> None:
    """Fails fast on bad detection settings (no model is built and no image decoded). The value rules
    (``natzoo.config``) have been checked already."""
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
    if stage == "fit" and cfg.get("ckpt_path"):
        _check_resume(cfg)
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


def _check_resume(cfg: DictConfig) -> None:
    """A resumed run's backbone, detector architecture and mask head must be the checkpoint's."""
    info = resolve_ckpt_path(str(cfg.ckpt_path))  # read once, by the config check
    saved = (info.hyper_parameters.get("detector") or {}) if info is not None else {}
    if not isinstance(saved, dict):
        return
    pairs = [("model.name", saved.get("backbone"), str(cfg.model.name)),
             ("model.arch", saved.get("arch"), cfg.model.get("arch"))]
    if info is not None and info.hyper_parameters.get("with_masks") is not None:
        pairs.append(("mask head (model.arch, data.with_masks)", info.hyper_parameters["with_masks"], _with_masks(cfg)))
    refused = [(key, old, new) for key, old, new in pairs if old is not None and old != new]
    if refused:
        listed = "; ".join(f"{key}: checkpoint {old!r}, config {new!r}" for key, old, new in refused)
        raise ValueError(f"ckpt_path={cfg.ckpt_path}: the config does not describe the run that wrote this checkpoint "
                         f"({listed}); resume with the checkpoint's settings")


def build_datamodule(cfg: DictConfig) -> CocoDataModule:
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


TASK = register_task(Task(
    name="detection",
    validate_config=validate_config,
    build_datamodule=build_datamodule,
    build_module=build_module,
    load_module_for_eval=load_module_for_eval,
    monitor=("val/bbox_mAP", "max"),
    summarize_eval=summarize_eval,
    module_class=DetectionModule,
    config_rules=DETECTION_RULES,
    curves={
        "loss": (("train/loss_epoch", "train loss (sum)"),),
        "mAP (%)": (("val/bbox_mAP", "box mAP"), ("val/bbox_mAP_50", "box mAP@50"), ("val/segm_mAP", "mask mAP"),
                    ("val/segm_mAP_50", "mask mAP@50")),
    },
))
