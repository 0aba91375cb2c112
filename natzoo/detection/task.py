"""Registers the ``detection`` task (``train.py``/``eval.py`` with ``task=detection``; see docs/detection.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from natzoo.config import check_choice, plain
from natzoo.detection.backbone import NATBackbone, load_backbone_checkpoint, model_family
from natzoo.detection.data import CocoDataModule
from natzoo.detection.detectors import ARCHITECTURES
from natzoo.detection.module import DetectionModule
from natzoo.detection.synthetic import SyntheticCocoSpec
from natzoo.models import load_weights
from natzoo.module_weights import network_weights
from natzoo.tasks import Task, register_task

__all__ = ["validate_config", "build_datamodule", "build_module", "load_module_for_eval", "summarize_eval"]

log = logging.getLogger(__name__)

# cfg.model keys passed to build_detector (``name`` becomes ``backbone``, ``kwargs`` the backbone overrides).
_DETECTOR_KEYS = ("arch", "fpn_channels", "min_size", "max_size", "anchor_sizes", "representation_size",
                  "mask_head_channels", "detector_kwargs")
_BACKBONE_KEYS = ("out_indices", "frozen_stages", "norm_eval", "dilations", "drop_path_rate")
_DATA_PATHS = ("train_images", "train_annotations", "val_images", "val_annotations")


def _with_masks(cfg: DictConfig) -> bool:
    data_masks = cfg.data.get("with_masks")
    return cfg.model.get("arch") == "maskrcnn" if data_masks is None else bool(data_masks)


def validate_config(cfg: DictConfig, stage: str) -> None:
    """Fails fast on bad detection settings (no model is built and no image decoded)."""
    model = cfg.get("model") or {}
    if stage == "eval" and cfg.get("ckpt_path"):
        if not Path(str(cfg.ckpt_path)).is_file():
            raise ValueError(f"ckpt_path={str(cfg.ckpt_path)!r} does not exist or is not a file")
    else:
        check_choice(model.get("arch"), "model.arch", ARCHITECTURES)
        model_family(str(model.get("name")))
    checkpoint = cfg.get("checkpoint")
    if checkpoint and not Path(str(checkpoint)).is_file():
        raise ValueError(f"checkpoint={str(checkpoint)!r} does not exist or is not a file")
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


def build_datamodule(cfg: DictConfig) -> CocoDataModule:
    """COCO-format data module from ``cfg.data`` (the shapes demo when ``data.synthetic`` is set)."""
    data = plain(cfg.data)
    keys = _DATA_PATHS + ("batch_size", "num_workers", "pin_memory", "filter_empty", "cache_dir")
    kwargs = {k: data[k] for k in keys if data.get(k) is not None}
    datamodule = CocoDataModule(
        **kwargs,
        val_batch_size=data.get("eval_batch_size"),
        with_masks=_with_masks(cfg),
        synthetic=data.get("synthetic") or None,
    )
    # The class count is needed to build the model, before the Trainer calls prepare_data/setup.
    datamodule.prepare_data()
    datamodule.setup("validate")
    return datamodule


def detector_config(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """``build_detector`` keyword arguments from ``cfg.model`` (``num_classes`` = foreground classes + 1)."""
    model = plain(cfg.model)
    config: dict[str, Any] = {k: model[k] for k in _DETECTOR_KEYS if model.get(k) is not None}
    config.update({k: model[k] for k in _BACKBONE_KEYS if model.get(k) is not None})
    config.update(model.get("kwargs") or {})
    config["backbone"] = model["name"]
    config["num_classes"] = num_classes + 1
    return config


def _module_kwargs(cfg: DictConfig) -> dict[str, Any]:
    optim, sched = plain(cfg.get("optim")) or {}, plain(cfg.get("sched")) or {}
    if optim.get("name", "adamw") != "adamw":
        raise ValueError(f"detection uses AdamW (optim.name=adamw), got optim.name={optim.get('name')!r}")
    kwargs = {k: optim[k] for k in ("lr", "weight_decay", "betas", "no_decay_keys") if k in optim}
    kwargs.update({k: sched[k] for k in ("warmup_steps", "warmup_ratio", "milestones", "milestone_unit", "gamma")
                   if k in sched})
    return kwargs


def build_module(cfg: DictConfig, datamodule: CocoDataModule) -> DetectionModule:
    """New detector for the dataset's classes; ``cfg.checkpoint`` initialises the backbone from classification
    weights (official ``.pth``, HF, or this project's classification ``.ckpt``)."""
    module = DetectionModule(
        detector_config(cfg, datamodule.num_classes), with_masks=_with_masks(cfg),
        category_ids=datamodule.val_set.category_ids, **_module_kwargs(cfg),
    )
    if cfg.get("checkpoint"):
        body: NATBackbone = module.model.backbone.body
        result = load_backbone_checkpoint(body, network_weights(str(cfg.checkpoint)), source=str(cfg.checkpoint))
        log.info("backbone initialised from %s (missing %s, unexpected %s)", cfg.checkpoint, result.missing_keys,
                 result.unexpected_keys)
    return module


def load_module_for_eval(cfg: DictConfig, datamodule: CocoDataModule) -> DetectionModule:
    """A Lightning checkpoint (``ckpt_path``; the detector is rebuilt from its hyper-parameters), or ``model`` with
    detector weights from ``checkpoint`` (a state dict of this project's detector)."""
    if cfg.get("ckpt_path"):
        module = DetectionModule.load_from_checkpoint(str(cfg.ckpt_path), map_location="cpu", weights_only=True)
        trained = module.hparams.detector["num_classes"] - 1
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
        raise ValueError("eval with task=detection needs ckpt_path=<Lightning .ckpt> or checkpoint=<detector weights>")
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
    result["num_images"] = len(datamodule.val_set)
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
))
