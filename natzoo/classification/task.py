"""Registers the ``classification`` task: config checks, data module, module builders and evaluation summary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig

from natzoo import models  # noqa: F401  (registers the NAT families with timm)
from natzoo.classification.module import NONFINITE_POLICIES, ClassificationModule
from natzoo.config import check_choice, check_positive_int, plain
from natzoo.datasets.demo import ensure_demo_dataset
from natzoo.datasets.folder import BAD_IMAGE_POLICIES, ImageFolderDataModule, check_image_folder_layout
from natzoo.models import load_weights
from natzoo.module_weights import network_weights
from natzoo.tasks import Task, register_task

__all__ = ["validate_config", "build_datamodule", "build_module", "load_module_for_eval", "summarize_eval"]

log = logging.getLogger(__name__)

CONFUSION_MATRIX_MAX_CLASSES = 50


def _check_model(cfg: DictConfig) -> None:
    model = cfg.get("model") or {}
    name = model.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"model.name must be a registered timm model name, got {name!r}")
    if not timm.is_model(name):
        family = name.split("_")[0]
        close = [m for m in timm.list_models() if m.startswith(family)][:10]
        raise ValueError(f"model.name={name!r} is not a registered timm model; close names: {close}")
    dpr = model.get("drop_path_rate")
    if dpr is not None and not 0.0 <= float(dpr) < 1.0:
        raise ValueError(f"model.drop_path_rate must be in [0, 1), got {dpr}")


def _prepare_data(cfg: DictConfig, stage: str) -> list[str]:
    """Generates the demo dataset when configured, then checks the folder layout; returns the class names."""
    data = cfg.data
    root = data.get("root")
    if root in (None, "", "???"):
        raise ValueError("data.root is not set: pass data.root=/path/to/dataset (ImageNet layout: <root>/train/<class>/"
                         "*.jpeg and <root>/val/<class>/*.jpeg)")
    check_positive_int(data.get("img_size"), "data.img_size", minimum=8)
    check_choice(data.get("bad_images", "error"), "data.bad_images", BAD_IMAGE_POLICIES)
    generate = data.get("generate")
    if generate:
        ensure_demo_dataset(root, **plain(generate))
    splits = [data.get("train_split", "train"), data.get("val_split", "val")]
    return check_image_folder_layout(root, splits if stage == "fit" else splits[1:])


def validate_config(cfg: DictConfig, stage: str) -> None:
    """Fails fast on bad classification settings; ``stage`` is ``"fit"`` or ``"eval"``."""
    check_choice(cfg.get("nonfinite_loss", "stop"), "nonfinite_loss", NONFINITE_POLICIES)
    if stage == "eval" and cfg.get("ckpt_path"):
        path = Path(str(cfg.ckpt_path))
        if not path.is_file():
            raise ValueError(f"ckpt_path={str(path)!r} does not exist or is not a file")
    else:
        _check_model(cfg)
    checkpoint = cfg.get("checkpoint")
    if checkpoint and not Path(str(checkpoint)).is_file():
        raise ValueError(f"checkpoint={str(checkpoint)!r} does not exist or is not a file")
    if stage == "fit" and cfg.get("nonfinite_loss") == "skip":
        devices = cfg.trainer.get("devices", 1)
        nodes = cfg.trainer.get("num_nodes", 1) or 1
        if (isinstance(devices, int) and devices > 1) or devices in (-1, "auto") and torch.cuda.device_count() > 1 \
                or nodes > 1:
            raise ValueError("nonfinite_loss=skip is only supported on a single device (a skipped step would desync "
                             "the gradient all-reduce); use nonfinite_loss=stop for multi-device runs")
    _prepare_data(cfg, stage)


def build_datamodule(cfg: DictConfig) -> ImageFolderDataModule:
    """Image-folder data module from ``cfg.data``."""
    data = plain(cfg.data)
    keys = ("root", "img_size", "batch_size", "eval_batch_size", "num_workers", "pin_memory", "train_split",
            "val_split", "train_transform", "eval_transform", "mean", "std", "bad_images", "drop_last",
            "persistent_workers")
    return ImageFolderDataModule(**{k: data[k] for k in keys if k in data})


def _module_kwargs(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    model = plain(cfg.model)
    return dict(
        model_name=model["name"],
        num_classes=num_classes,
        model_kwargs=model.get("kwargs") or {},
        drop_path_rate=model.get("drop_path_rate"),
        freeze=list(model.get("freeze") or []),
        optim=plain(cfg.get("optim")) or {},
        sched=plain(cfg.get("sched")) or {},
        mixup=plain(cfg.data.get("mixup")) or {},
        ema=plain(cfg.get("ema")) or {},
        nonfinite_loss=cfg.get("nonfinite_loss", "stop"),
        channels_last=bool(cfg.get("channels_last", False)),
        compile=bool(cfg.get("compile", False)),
    )


def build_module(cfg: DictConfig, datamodule: ImageFolderDataModule) -> ClassificationModule:
    """New module for the dataset's classes, initialised from ``cfg.checkpoint`` (new head if the class count
    differs) when given (fine-tuning)."""
    num_classes = len(datamodule.check_layout(with_train=True))
    module = ClassificationModule(**_module_kwargs(cfg, num_classes))
    if cfg.get("checkpoint"):
        # The head is kept when it fits the dataset's classes, else re-initialised (fine-tuning); load_weights logs it.
        report = load_weights(module.model, network_weights(str(cfg.checkpoint)), head="auto",
                              source=str(cfg.checkpoint))
        log.info("initialised %s from %s (classifier: %s)", cfg.model.name, cfg.checkpoint, report.head)
        if module.model_ema is not None:
            module.model_ema.set(module.model)
    return module


def load_module_for_eval(cfg: DictConfig, datamodule: ImageFolderDataModule) -> ClassificationModule:
    """The module to evaluate: a Lightning checkpoint (``ckpt_path``), or ``model`` + ``checkpoint`` (official / HF /
    flat state-dict file), or ``model`` with timm's pretrained weights (``pretrained=true``)."""
    num_classes = len(datamodule.check_layout(with_train=False))
    if cfg.get("ckpt_path"):
        module = ClassificationModule.load_from_checkpoint(str(cfg.ckpt_path), map_location="cpu", weights_only=True)
        if module.num_classes != num_classes:
            raise ValueError(f"ckpt_path {cfg.ckpt_path} was trained for {module.num_classes} classes but "
                             f"{cfg.data.root} has {num_classes}")
        if cfg.get("use_ema"):
            if module.model_ema is None:
                raise ValueError(f"use_ema=true but {cfg.ckpt_path} was trained without EMA (ema.enabled=false)")
            module.model.load_state_dict(module.model_ema.module.state_dict())
        return module
    kwargs = _module_kwargs(cfg, num_classes)
    kwargs["ema"] = {}
    if cfg.get("pretrained"):
        kwargs["model_kwargs"] = dict(kwargs["model_kwargs"], pretrained=True)
    module = ClassificationModule(**kwargs)
    if cfg.get("checkpoint"):
        load_weights(module.model, network_weights(str(cfg.checkpoint)), head="strict", source=str(cfg.checkpoint))
    return module


def summarize_eval(cfg: DictConfig, module: ClassificationModule, datamodule: ImageFolderDataModule,
                   metrics: dict[str, float], output_dir: Path) -> dict[str, Any]:
    """JSON-able result (top-1/top-5 in percent, loss, throughput) and, for few classes, a confusion-matrix PNG."""
    result: dict[str, Any] = {
        "top1": 100.0 * metrics["val/acc1"],
        "top5": 100.0 * metrics["val/acc5"],
        "top5_k": min(5, module.num_classes),
        "loss": metrics["val/loss"],
        "num_images": module.eval_images,
        "num_classes": module.num_classes,
        "model_images_per_second": (module.eval_images / module.eval_model_seconds
                                    if module.eval_model_seconds else None),
    }
    if "val_ema/acc1" in metrics:
        result["ema"] = {"top1": 100.0 * metrics["val_ema/acc1"], "top5": 100.0 * metrics["val_ema/acc5"],
                         "loss": metrics["val_ema/loss"]}
    if module.skipped_images:
        result["skipped_images"] = module.skipped_images
    if module.confusion is not None:
        from natzoo.plots import plot_confusion_matrix

        matrix = module.confusion.compute().cpu()
        path = output_dir / "confusion_matrix.png"
        plot_confusion_matrix(matrix, datamodule.classes, path, title=f"{cfg.model.get('name', '')} top-1 "
                              f"{result['top1']:.2f}%")
        result["confusion_matrix"] = matrix.tolist()
        result["confusion_matrix_png"] = str(path)
    return result


def _wants_confusion(cfg: DictConfig, num_classes: int) -> bool:
    setting = cfg.get("confusion_matrix", "auto")
    if setting == "auto":
        return num_classes <= CONFUSION_MATRIX_MAX_CLASSES
    return bool(setting)


def _before_eval(cfg: DictConfig, module: ClassificationModule, datamodule: ImageFolderDataModule) -> None:
    if _wants_confusion(cfg, module.num_classes):
        module.enable_confusion_matrix()


TASK = register_task(Task(
    name="classification",
    validate_config=validate_config,
    build_datamodule=build_datamodule,
    build_module=build_module,
    load_module_for_eval=load_module_for_eval,
    monitor=("val/acc1", "max"),
    summarize_eval=summarize_eval,
    before_eval=_before_eval,
))
