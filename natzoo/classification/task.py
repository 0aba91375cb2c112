"""Registers the ``classification`` task: config checks, data module, module builders and evaluation summary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

from natzoo import models  # noqa: F401  (registers the NAT families with timm)
from natzoo.checkpoints import differences, lightning_hyper_parameters, network_weights, resolve_ckpt_path
from natzoo.classification.module import ClassificationModule
from natzoo.config import CLASSIFICATION_RULES, plain
from natzoo.datasets.demo import ensure_demo_dataset
from natzoo.datasets.folder import ImageFolderDataModule, check_image_folder_layout
from natzoo.datasets.readers import READER_DATAMODULES, check_reader_source
from natzoo.models import load_weights
from natzoo.run.tasks import Task, register_task

__all__ = [
    "build_datamodule",
    "build_module",
    "image_config",
    "load_module_for_eval",
    "summarize_eval",
    "validate_config",
]

log = logging.getLogger(__name__)

CONFUSION_MATRIX_MAX_CLASSES = 50

# Keys of a classification data config that configure other pieces than ImageFolderDataModule.
_NOT_DATAMODULE_ARGS = ("name", "generate", "mixup")


def _check_model(cfg: DictConfig) -> None:
    name = cfg.model.name
    if not timm.is_model(name):
        family = name.split("_")[0]
        close = [m for m in timm.list_models() if m.startswith(family)][:10]
        raise ValueError(f"model.name={name!r} is not a registered timm model; close names: {close}")


def _prepare_data(cfg: DictConfig, stage: str) -> list[str]:
    """Generates the demo dataset when configured, then checks the folder layout; returns the class names."""
    data = cfg.data
    if data.get("_target_") in READER_DATAMODULES:  # data=wds / data=hfds: shards or a saved dataset, no folders
        check_reader_source(plain(data), stage)
        return []
    root = data.get("root")
    if root in (None, "", "???"):
        raise ValueError("data.root is not set: pass data.root=/path/to/dataset (ImageNet layout: <root>/train/<class>/"
                         "*.jpeg and <root>/val/<class>/*.jpeg)")
    generate = data.get("generate")
    if generate:
        ensure_demo_dataset(root, **plain(generate))
    splits = [data.get("train_split", "train"), data.get("val_split", "val")]
    return check_image_folder_layout(root, splits if stage == "fit" else splits[1:])


# Module arguments (saved hyper-parameters) -> the config keys that set them, for messages.
_CONFIG_KEYS = {"model_name": "model.name", "model_kwargs": "model.kwargs", "drop_path_rate": "model.drop_path_rate",
                "freeze": "model.freeze", "mixup": "data.mixup", "num_classes": "the class count of data.root"}
# On resume these must equal the checkpoint's: the network (its architecture and classes), which parameters train,
# whether an EMA copy exists, and how the optimizer groups parameters (the saved optimizer state fits only those).
_RESUME_REFUSED = ("model_name", "model_kwargs", "num_classes", "freeze", "ema.enabled", "optim.name",
                   "optim.no_decay_1d", "optim.no_decay_rpb", "optim.no_decay_names")
# The optimizer's hyper-parameters come back with its saved state (param_groups, the scheduler's base_lrs).
_RESUME_RESTORED = ("optim.",)


def _config_key(key: str) -> str:
    head, _, rest = key.partition(".")
    name = _CONFIG_KEYS.get(head, head)
    return f"{name}.{rest}" if rest else name


def _explicit_model() -> bool:
    """Whether the command line chose the model (``model=...`` or ``model.*=...``; False outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    return any(o.split("=", 1)[0].lstrip("+~").split(".")[0] == "model" for o in HydraConfig.get().overrides.task)


def check_resume(cfg: DictConfig, saved: dict[str, Any], num_classes: int) -> list[tuple[str, Any, Any]]:
    """Compares the composed config with the checkpoint's hyper-parameters before anything is built.

    Returns:
        The differences the resumed run applies (``(config key, checkpoint value, config value)``); the optimizer's
        hyper-parameters, restored from the checkpoint, are logged as overridden.

    Raises:
        ValueError: the model, its architecture, the class count, the frozen parameters, EMA on/off or the
            optimizer's parameter grouping differ (naming each key with both values).
    """
    current = _module_kwargs(cfg, num_classes)
    found = [(key, old, new) for key, old, new in differences(saved, current)
             if key.split(".")[0] in current and not (key.startswith("model_kwargs.") and old is None and new is None)]
    refused = [d for d in found if any(d[0] == k or d[0].startswith(k + ".") for k in _RESUME_REFUSED)]
    if refused:
        listed = "; ".join(f"{_config_key(k)}: checkpoint {old!r}, config {new!r}" for k, old, new in refused)
        raise ValueError(f"ckpt_path={cfg.ckpt_path}: the config does not describe the run that wrote this checkpoint "
                         f"({listed}). Resume with the checkpoint's settings (the resume command printed by train.py "
                         "has them), or start a new run that initialises from its weights with checkpoint=<file>")
    restored = [d for d in found if d[0].startswith(_RESUME_RESTORED)]
    if restored:
        log.warning("ckpt_path: the optimizer state saved in the checkpoint overrides %s (restored values are used)",
                    "; ".join(f"{_config_key(k)}={new!r} (checkpoint: {old!r})" for k, old, new in restored))
    applied = [d for d in found if d not in restored]
    if applied:
        log.info("ckpt_path: changed from the checkpoint and applied: %s",
                 "; ".join(f"{_config_key(k)}: {old!r} -> {new!r}" for k, old, new in applied))
    return applied


def _check_weights_pairing(cfg: DictConfig, stage: str) -> None:
    """A natzoo Lightning checkpoint knows its model: ``model=`` must agree with ``checkpoint=``'s, and with
    ``ckpt_path=``'s in evaluation when the command line names a model."""
    checkpoint = cfg.get("checkpoint")
    if checkpoint:
        saved = lightning_hyper_parameters(str(checkpoint))
        if saved is not None and saved.get("model_name") not in (None, str(cfg.model.name)):
            raise ValueError(f"checkpoint={str(checkpoint)!r} holds a {saved['model_name']} (a natzoo checkpoint "
                             f"records its model), but model.name={cfg.model.name!r}: pass model="
                             f"{saved['model_name']}, or ckpt_path= to take the model from the checkpoint")
    if stage == "eval" and cfg.get("ckpt_path") and _explicit_model():
        info = resolve_ckpt_path(str(cfg.ckpt_path))
        name = info.hyper_parameters.get("model_name") if info is not None else None
        if name is not None and name != str(cfg.model.name):
            raise ValueError(f"ckpt_path={str(cfg.ckpt_path)!r} holds a {name}, but the command line chose "
                             f"model.name={cfg.model.name!r}: drop model= (the model comes from the checkpoint) or "
                             "evaluate the checkpoint of that model")


def validate_config(cfg: DictConfig, stage: str) -> None:
    """Fails fast on bad classification settings; ``stage`` is ``"fit"`` or ``"eval"``. The value rules
    (``natzoo.config``) have been checked already; a resumed run's config is compared with its checkpoint's
    (:func:`check_resume`)."""
    if not (stage == "eval" and cfg.get("ckpt_path")):
        _check_model(cfg)
    checkpoint = cfg.get("checkpoint")
    if checkpoint and not Path(str(checkpoint)).is_file():
        raise ValueError(f"checkpoint={str(checkpoint)!r} does not exist or is not a file")
    if stage == "eval" and cfg.get("use_ema") and not (cfg.get("ckpt_path") or checkpoint):
        raise ValueError("use_ema=true needs a checkpoint holding EMA weights: ckpt_path=<.ckpt> or checkpoint=<.ckpt>")
    _check_weights_pairing(cfg, stage)
    if stage == "fit" and cfg.get("nonfinite_loss") == "skip":
        devices = cfg.trainer.get("devices", 1)
        nodes = cfg.trainer.get("num_nodes", 1) or 1
        if (isinstance(devices, int) and devices > 1) or devices in (-1, "auto") and torch.cuda.device_count() > 1 \
                or nodes > 1:
            raise ValueError("nonfinite_loss=skip is only supported on a single device (a skipped step would desync "
                             "the gradient all-reduce); use nonfinite_loss=stop for multi-device runs")
    classes = _prepare_data(cfg, stage)
    if stage == "fit" and cfg.get("ckpt_path"):
        info = resolve_ckpt_path(str(cfg.ckpt_path))
        if info is not None:
            check_resume(cfg, info.hyper_parameters, len(classes))


def _model_name(cfg: DictConfig) -> str:
    if cfg.get("ckpt_path"):
        info = resolve_ckpt_path(str(cfg.ckpt_path))  # read once, by the config check
        if info is not None and info.hyper_parameters.get("model_name"):
            return str(info.hyper_parameters["model_name"])
    return str(cfg.model.name)


def image_config(data: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Input size, mean/std and evaluation crop: the data config's values where set, else the model's pretrained
    config (timm's ``resolve_data_config``, which falls back to timm's defaults).

    Args:
        data: the (plain) data config.
        model_name: timm name of the model, optionally with a pretrained tag.

    Returns:
        ``img_size``, ``mean``, ``std`` and ``eval_transform`` (with ``crop_pct``, ``crop_mode``, ``interpolation``).
    """
    evaluation = dict(data.get("eval_transform") or {})
    size = data.get("img_size")
    given = {"input_size": (3, size, size) if size else None, "mean": data.get("mean"), "std": data.get("std"),
             **{k: evaluation.get(k) for k in ("crop_pct", "crop_mode", "interpolation")}}
    pretrained = get_pretrained_cfg(model_name)
    resolved = resolve_data_config(args={k: v for k, v in given.items() if v is not None},
                                   pretrained_cfg=pretrained.to_dict() if pretrained is not None else {})
    evaluation.update({k: resolved[k] for k in ("crop_pct", "crop_mode", "interpolation")})
    return {"img_size": int(resolved["input_size"][-1]), "mean": tuple(resolved["mean"]),
            "std": tuple(resolved["std"]), "eval_transform": evaluation}


def build_datamodule(cfg: DictConfig) -> ImageFolderDataModule:
    """Image-folder data module from ``cfg.data`` (its ``_target_``), with the unset preprocessing values taken
    from the model's pretrained config (:func:`image_config`)."""
    data = plain(cfg.data)
    for key in _NOT_DATAMODULE_ARGS:
        data.pop(key, None)
    data.update(image_config(data, _model_name(cfg)))
    return instantiate(data, _convert_="all")


def _module_kwargs(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    model = plain(cfg.model)
    return {
        "model_name": model["name"],
        "num_classes": num_classes,
        "model_kwargs": model.get("kwargs") or {},
        "drop_path_rate": model.get("drop_path_rate"),
        "freeze": list(model.get("freeze") or []),
        "optim": plain(cfg.get("optim")),
        "sched": plain(cfg.get("sched")),
        "mixup": plain(cfg.data.get("mixup")),
        "ema": plain(cfg.get("ema")),
        "nonfinite_loss": cfg.get("nonfinite_loss", "stop"),
        "channels_last": bool(cfg.get("channels_last", False)),
        "compile": plain(cfg.get("compile", False)),
        "loss": plain(cfg.get("loss")),
    }


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
    flat state-dict file), or ``model`` with timm's pretrained weights (``pretrained=true``), or, only with
    ``random_weights=true``, a randomly initialised ``model``."""
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
    kwargs.update(ema=None, optim=None, sched=None)
    if cfg.get("pretrained"):
        kwargs["model_kwargs"] = dict(kwargs["model_kwargs"], pretrained=True)
    module = ClassificationModule(**kwargs)
    if cfg.get("checkpoint"):
        weights = network_weights(str(cfg.checkpoint), use_ema=bool(cfg.get("use_ema", False)))
        load_weights(module.model, weights, head="strict", source=str(cfg.checkpoint))
    return module


def summarize_eval(cfg: DictConfig, module: ClassificationModule, datamodule: ImageFolderDataModule,
                   metrics: dict[str, float], output_dir: Path) -> dict[str, Any]:
    """JSON-able result (top-1/top-5 in percent, loss, preprocessing) and, for few classes, a confusion-matrix PNG."""
    result: dict[str, Any] = {
        "top1": 100.0 * metrics["val/acc1"],
        "top5": 100.0 * metrics["val/acc5"],
        "top5_k": min(5, module.num_classes),
        "loss": metrics["val/loss"],
        "num_classes": module.num_classes,
        "preprocessing": {"img_size": datamodule.img_size, "mean": list(datamodule.mean), "std": list(datamodule.std),
                          **datamodule.eval_transform_args},
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
        # Lightning's hparams is an AttributeDict (typed as a plain mapping)
        plot_confusion_matrix(matrix, datamodule.classes, path, title=f"{module.hparams.model_name} top-1 "  # type: ignore[attr-defined]
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
    module_class=ClassificationModule,
    config_rules=CLASSIFICATION_RULES,
    curves={
        "loss": (("train/loss_epoch", "train loss"), ("val/loss", "val loss"), ("val_ema/loss", "val loss (EMA)")),
        "accuracy (%)": (("train/acc1", "train top-1"), ("val/acc1", "val top-1"), ("val/acc5", "val top-5"),
                         ("val_ema/acc1", "val top-1 (EMA)")),
    },
))
