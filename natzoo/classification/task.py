"""Registers the ``classification`` task: config checks, data module, module builders and evaluation summary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

from natzoo import models  # noqa: F401  (registers the NAT families with timm)
from natzoo.checkpoints import CheckpointInfo, differences, lightning_hyper_parameters, network_weights
from natzoo.classification.module import ClassificationModule, mixup_active
from natzoo.classification.rules import CLASSIFICATION_RULES, LossName, NonfiniteLoss
from natzoo.datasets.demo import ensure_demo_dataset
from natzoo.datasets.folder import ImageFolderDataModule, check_image_folder_layout
from natzoo.datasets.readers import READER_DATAMODULES, check_reader_source
from natzoo.datasets.samplers import one_process_aug_repeats
from natzoo.models import load_weights, pretrained_file
from natzoo.rules import plain
from natzoo.run.tasks import Difference, Task, register_task

__all__ = [
    "ClassificationTask",
    "build_datamodule",
    "build_module",
    "image_config",
    "load_module_for_eval",
    "resume_differences",
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
    # Only the demo config generates: `debug=tiny` adds its (smaller) generator settings to any data config, and with
    # data=folder they must not turn the user's folder into a demo dataset to be checked for natzoo's record.
    if generate and data.get("name", "demo") == "demo":
        ensure_demo_dataset(root, **plain(generate))
    splits = [data.get("train_split", "train"), data.get("val_split", "val")]
    return check_image_folder_layout(root, splits if stage == "fit" else splits[1:])


# Module arguments (saved hyper-parameters) -> the config keys that set them, for messages.
_CONFIG_KEYS = {"model_name": "model.name", "model_kwargs": "model.kwargs", "drop_path_rate": "model.drop_path_rate",
                "freeze": "model.freeze", "mixup": "data.mixup", "num_classes": "the class count of data.root"}
# On resume these must equal the checkpoint's: the network (its architecture and classes), which parameters train,
# whether an EMA copy exists, and how the optimizer groups parameters (the saved optimizer state fits only those).
_RESUME_REFUSED = ("model_name", "model_kwargs", "num_classes", "freeze", "ema.enabled", "optim.name",
                   "optim.no_decay_1d", "optim.no_decay_rpb", "optim.no_decay_names", "optim.layer_decay")
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


def resume_differences(cfg: DictConfig, ckpt: CheckpointInfo) -> list[Difference]:
    """Where the composed config differs from the hyper-parameters of the checkpoint a run resumes from: refused for
    the model, its architecture, the class count, the frozen parameters, EMA on/off and the optimizer's parameter
    grouping, and the class names the checkpoint records (a renamed class folder would shift every label); restored
    (from the saved state) for the optimizer's hyper-parameters; applied for the rest."""
    classes = _prepare_data(cfg, "fit")
    current = _module_kwargs(cfg, len(classes))
    found = [(key, old, new) for key, old, new in differences(ckpt.hyper_parameters, current)
             if key.split(".")[0] in current and not (key.startswith("model_kwargs.") and old is None and new is None)]
    result = []
    for key, old, new in found:
        if any(key == k or key.startswith(k + ".") for k in _RESUME_REFUSED):
            result.append(Difference(_config_key(key), old, new, "refused"))
        elif key.startswith(_RESUME_RESTORED):
            result.append(Difference(_config_key(key), old, new, "restored"))
        else:
            result.append(Difference(_config_key(key), old, new, "applied"))
    if ckpt.label_names is not None and classes and list(ckpt.label_names) != list(classes):
        # Same count, other names or order (a renamed or added class folder): the outputs would mean other classes.
        result.append(Difference("data.root classes", list(ckpt.label_names), list(classes), "refused"))
    return result


def _check_weights_pairing(cfg: DictConfig, stage: str, ckpt: CheckpointInfo | None) -> None:
    """A natzoo Lightning checkpoint knows its model: ``model=`` must agree with ``checkpoint=``'s, and with
    ``ckpt_path=``'s in evaluation when the command line names a model."""
    checkpoint = cfg.get("checkpoint")
    if checkpoint:
        saved = lightning_hyper_parameters(str(checkpoint))
        if saved is not None and saved.get("model_name") not in (None, str(cfg.model.name)):
            raise ValueError(f"checkpoint={str(checkpoint)!r} holds a {saved['model_name']} (a natzoo checkpoint "
                             f"records its model), but model.name={cfg.model.name!r}: pass model="
                             f"{saved['model_name']}, or ckpt_path= to take the model from the checkpoint")
    if stage == "eval" and ckpt is not None and _explicit_model():
        name = ckpt.hyper_parameters.get("model_name")
        if name is not None and name != str(cfg.model.name):
            raise ValueError(f"ckpt_path={str(cfg.ckpt_path)!r} holds a {name}, but the command line chose "
                             f"model.name={cfg.model.name!r}: drop model= (the model comes from the checkpoint) or "
                             "evaluate the checkpoint of that model")


def validate_config(cfg: DictConfig, stage: str, ckpt: CheckpointInfo | None) -> None:
    """Fails fast on bad classification settings; ``stage`` is ``"fit"`` or ``"eval"``, ``ckpt`` the resolved
    ``ckpt_path``. The value rules have been checked already."""
    if not (stage == "eval" and cfg.get("ckpt_path")):
        _check_model(cfg)
    checkpoint = cfg.get("checkpoint")
    if checkpoint and not Path(str(checkpoint)).is_file():
        raise ValueError(f"checkpoint={str(checkpoint)!r} does not exist or is not a file")
    if stage == "fit" and cfg.model.get("pretrained") and checkpoint:
        raise ValueError(f"model.pretrained=true and checkpoint={str(checkpoint)!r} both name the starting weights: "
                         "pass one of them")
    if stage == "eval" and cfg.get("use_ema") and not (cfg.get("ckpt_path") or checkpoint):
        raise ValueError("use_ema=true needs a checkpoint holding EMA weights: ckpt_path=<.ckpt> or checkpoint=<.ckpt>")
    _check_weights_pairing(cfg, stage, ckpt)
    if stage == "fit" and cfg.get("nonfinite_loss") == NonfiniteLoss.SKIP.value:
        devices = cfg.trainer.get("devices", 1)
        nodes = cfg.trainer.get("num_nodes", 1) or 1
        if (isinstance(devices, int) and devices > 1) or devices in (-1, "auto") and torch.cuda.device_count() > 1 \
                or nodes > 1:
            raise ValueError("nonfinite_loss=skip is only supported on a single device (a skipped step would desync "
                             "the gradient all-reduce); use nonfinite_loss=stop for multi-device runs")
    if stage == "fit":
        _check_callbacks(cfg)
        loss = cfg.get("loss") or {}
        if loss.get("name", "ce") != "bce" and (loss.get("bce_target_threshold") is not None or loss.get("bce_sum")):
            key = "bce_target_threshold" if loss.get("bce_target_threshold") is not None else "bce_sum"
            raise ValueError(f"loss.{key}={loss.get(key)!r} applies to loss.name=bce only, and this run trains with "
                             f"loss.name={loss.get('name', 'ce')!r}: add loss.name=bce, or drop loss.{key}")
    repeats = cfg.data.get("aug_repeats")
    if stage == "fit" and repeats and process_count(cfg) == 1:
        raise ValueError(one_process_aug_repeats(int(repeats)))
    _prepare_data(cfg, stage)


def _logged_metrics(cfg: DictConfig) -> list[str]:
    """The metrics a classification run logs (ClassificationModule): validation loss/top-1/top-5 (also of the EMA
    weights with ``ema.enabled`` and ``ema.evaluate``) and the training loss."""
    prefixes = ["val"] + (["val_ema"] if cfg.get("ema", {}).get("enabled") and cfg.ema.get("evaluate", True) else [])
    return [f"{p}/{m}" for p in prefixes for m in ("loss", "acc1", "acc5")] + ["train/loss"]


def _check_callbacks(cfg: DictConfig) -> None:
    """Callback settings that would fail only after training: exporting EMA weights of a run without EMA, averaging
    by a metric the run never logs."""
    callbacks = cfg.get("callbacks") or {}
    timm_model = callbacks.get("timm_model") or {}
    if timm_model.get("enabled") and timm_model.get("use_ema") and not cfg.get("ema", {}).get("enabled"):
        raise ValueError("callbacks.timm_model.use_ema=true exports the EMA weights, but this run keeps none "
                         "(ema.enabled=false): add ema.enabled=true, or drop callbacks.timm_model.use_ema")
    averaging = callbacks.get("average_checkpoints") or {}
    monitor = averaging.get("monitor")
    if averaging.get("top_k") and monitor is not None and str(monitor) not in _logged_metrics(cfg):
        raise ValueError(f"callbacks.average_checkpoints.monitor={str(monitor)!r} is not a metric this run logs; "
                         f"choose one of {_logged_metrics(cfg)} (null: the run's own, val/acc1)")


def process_count(cfg: DictConfig) -> int | None:
    """How many training processes ``cfg.trainer`` starts (devices x nodes), or None when only Lightning can tell."""
    trainer = cfg.get("trainer") or {}
    devices = plain(trainer.get("devices", "auto"))
    nodes = trainer.get("num_nodes", 1) or 1
    accelerator = str(trainer.get("accelerator", "auto"))
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    count: int | None
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        count = devices
    elif devices in ("auto", -1, "-1") and (accelerator == "cpu" or not torch.cuda.is_available()):
        count = 1 if devices == "auto" else None  # Lightning's "auto" on the CPU is one process
    else:
        return None
    return count * int(nodes) if count is not None and isinstance(nodes, int) else None


def _model_name(cfg: DictConfig, ckpt: CheckpointInfo | None) -> str:
    if ckpt is not None and ckpt.hyper_parameters.get("model_name"):
        return str(ckpt.hyper_parameters["model_name"])
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


def build_datamodule(cfg: DictConfig, ckpt: CheckpointInfo | None = None) -> ImageFolderDataModule:
    """Image-folder data module from ``cfg.data`` (its ``_target_``), with the unset preprocessing values taken
    from the pretrained config of the model (``ckpt``'s when given, :func:`image_config`)."""
    data = plain(cfg.data)
    for key in _NOT_DATAMODULE_ARGS:
        data.pop(key, None)
    data.update(image_config(data, _model_name(cfg, ckpt)))
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
        "nonfinite_loss": cfg.get("nonfinite_loss", NonfiniteLoss.STOP.value),
        "channels_last": bool(cfg.get("channels_last", False)),
        "compile": plain(cfg.get("compile", False)),
        "loss": plain(cfg.get("loss")),
    }


def _announce_features(cfg: DictConfig) -> None:
    """One confirmation line per training feature switched on (each of them changes what training computes)."""
    lines = []
    optim = cfg.get("optim") or {}
    if optim.get("layer_decay"):
        decay = optim["layer_decay"]
        lines.append(f"layer-wise lr decay {decay}: each block's lr is scaled by {decay} per block below the head")
    loss = cfg.get("loss") or {}
    if LossName(loss.get("name", LossName.CE.value)) is LossName.BCE:
        lines.append(f"loss: binary cross-entropy, one sigmoid per class (target threshold "
                     f"{loss.get('bce_target_threshold')}, {'sum' if loss.get('bce_sum') else 'mean'} over classes)")
    repeats = int(cfg.data.get("aug_repeats", 0) or 0)
    if repeats:
        lines.append(f"repeated augmentation: each training image {repeats} times per epoch, differently augmented")
    ema = cfg.get("ema") or {}
    if ema.get("enabled"):
        lines.append(f"EMA of the weights: decay {ema.get('decay')}{', with warmup' if ema.get('warmup') else ''}"
                     f"{'; validated as val_ema/*' if ema.get('evaluate', True) else ''}")
    mixup = plain(cfg.data.get("mixup")) or {}
    if mixup_active(mixup):
        lines.append(f"mixup/cutmix: mixup_alpha {mixup.get('mixup_alpha')}, cutmix_alpha {mixup.get('cutmix_alpha')}, "
                     f"prob {mixup.get('prob')}, label smoothing {mixup.get('label_smoothing')}")
    freeze = list(cfg.model.get("freeze") or [])
    if freeze:
        lines.append(f"frozen parameters: {', '.join(freeze)}")
    if cfg.get("channels_last"):
        lines.append("channels-last memory format")
    if cfg.get("compile"):
        lines.append("torch.compile of the network")
    if cfg.model.get("pretrained"):
        lines.append(f"fine-tuning from the published weights of {cfg.model.name}")
    if getattr(rank_zero_only, "rank", 0) == 0:  # one line per run, not one per DDP process
        for line in lines:
            log.info(line)


def build_module(cfg: DictConfig, datamodule: ImageFolderDataModule) -> ClassificationModule:
    """New module for the dataset's classes, initialised from the published weights (``model.pretrained``) or
    ``cfg.checkpoint`` (new head if the class count differs) when given (fine-tuning); the training features switched
    on are confirmed, one line each."""
    num_classes = len(datamodule.check_layout(with_train=True))
    module = ClassificationModule(**_module_kwargs(cfg, num_classes))
    _announce_features(cfg)
    if cfg.model.get("pretrained"):
        # timm's published weights of the variant, through the one checked loader (head re-initialised when the class
        # count differs); the network's saved arguments stay those of a plain model, so a checkpoint never downloads.
        file = pretrained_file(str(cfg.model.name), plain(cfg.model.get("pretrained_cfg_overlay")) or None)
        load_weights(module.model, file, head="auto", use_ema=True, source=f"{cfg.model.name} pretrained ({file})")
    if cfg.get("checkpoint"):
        # The head is kept when it fits the dataset's classes, else re-initialised (fine-tuning); load_weights says
        # which, in its one line.
        load_weights(module.model, network_weights(str(cfg.checkpoint)), head="auto", source=str(cfg.checkpoint))
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


class ClassificationTask(Task):
    """Image classification with any timm-registered model (``task=classification``, the default)."""

    name = "classification"
    module_class = ClassificationModule
    monitor = ("val/acc1", "max")
    config_rules = CLASSIFICATION_RULES
    curves = {
        "loss": (("train/loss_epoch", "train loss"), ("val/loss", "val loss"), ("val_ema/loss", "val loss (EMA)")),
        "accuracy (%)": (("train/acc1", "train top-1"), ("val/acc1", "val top-1"), ("val/acc5", "val top-5"),
                         ("val_ema/acc1", "val top-1 (EMA)")),
    }

    def validate_config(self, cfg: Any, stage: str, ckpt: CheckpointInfo | None) -> None:
        """See :func:`validate_config`."""
        validate_config(cfg, stage, ckpt)

    def resume_differences(self, cfg: Any, ckpt: CheckpointInfo) -> list[Difference]:
        """See :func:`resume_differences`."""
        return resume_differences(cfg, ckpt)

    def build_datamodule(self, cfg: Any, ckpt: CheckpointInfo | None) -> ImageFolderDataModule:
        """See :func:`build_datamodule`."""
        return build_datamodule(cfg, ckpt)

    def build_module(self, cfg: Any, datamodule: Any) -> ClassificationModule:
        """See :func:`build_module`."""
        return build_module(cfg, datamodule)

    def load_module_for_eval(self, cfg: Any, datamodule: Any) -> ClassificationModule:
        """See :func:`load_module_for_eval`."""
        return load_module_for_eval(cfg, datamodule)

    def before_eval(self, cfg: Any, module: Any, datamodule: Any) -> None:
        """Turns on the confusion matrix (``confusion_matrix``)."""
        _before_eval(cfg, module, datamodule)

    def summarize_eval(self, cfg: Any, module: Any, datamodule: Any, metrics: dict[str, float],
                       output_dir: Path) -> dict:
        """See :func:`summarize_eval`."""
        return summarize_eval(cfg, module, datamodule, metrics, output_dir)


TASK = register_task(ClassificationTask())
