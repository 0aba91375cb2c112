"""LightningModule for image classification with any timm-registered model (NAT/DiNAT by default)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from natzoo import models  # noqa: F401  (registers the NAT families with timm)
from natzoo.config import (
    CLASSIFICATION_RULES,
    COMMON_RULES,
    Integer,
    check_settings,
)
from natzoo.optim import check_optim_settings, configure_optimizers
from natzoo.tools.model_info import RECORD_KEY, record_for_module

__all__ = ["ClassificationModule", "create_model"]

log = logging.getLogger(__name__)

_MIXUP_RULES = {k.removeprefix("data.mixup."): r for k, r in CLASSIFICATION_RULES.items()
                if k.startswith("data.mixup.")}
_EMA_RULES = {k.removeprefix("ema."): r for k, r in COMMON_RULES.items() if k.startswith("ema.")}
_LOSS_RULES = {k.removeprefix("loss."): r for k, r in CLASSIFICATION_RULES.items() if k.startswith("loss.")}
_ARGUMENT_RULES = {
    "model_name": COMMON_RULES["model.name"],
    "num_classes": Integer(1),
    "model_kwargs": COMMON_RULES["model.kwargs"],
    "drop_path_rate": COMMON_RULES["model.drop_path_rate"],
    "freeze": CLASSIFICATION_RULES["model.freeze"],
    **{k: COMMON_RULES[k] for k in ("nonfinite_loss", "channels_last", "compile")},
}


def create_model(name: str, num_classes: int, drop_path_rate: float | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a readable error for unknown names; ``drop_path_rate=None`` keeps the default."""
    if not timm.is_model(name):
        close = [m for m in timm.list_models() if name.split("_")[0] in m][:8]
        raise ValueError(f"model.name={name!r} is not a registered timm model (close names: {close})")
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = float(drop_path_rate)
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def _mixup_active(mixup: dict[str, Any]) -> bool:
    alphas = mixup.get("mixup_alpha", 0.0) > 0 or mixup.get("cutmix_alpha", 0.0) > 0
    return (alphas or mixup.get("cutmix_minmax") is not None) and mixup.get("prob", 1.0) > 0


class ClassificationModule(pl.LightningModule):
    """Classification with mixup/cutmix, label smoothing, EMA and top-1/top-5; optimizer and schedule from the
    ``optim``/``sched`` settings (:func:`natzoo.optim.configure_optimizers`).

    Every constructor argument is a plain Python value saved with ``save_hyperparameters``, so a checkpoint loads
    without Hydra: ``ClassificationModule.load_from_checkpoint(path, weights_only=True)``. The settings dictionaries
    have no defaults here: they come whole from ``configs/`` (``optim``, ``sched``, ``data.mixup``, ``ema``) and are
    checked against the same rules as the configs when the module is built.

    Args:
        model_name: timm registry name (e.g. ``nat_mini``).
        num_classes: classifier outputs.
        model_kwargs: keyword arguments overriding the variant's architecture (``embed_dim``, ``depths``, ...).
        drop_path_rate: stochastic depth; None keeps the variant's default.
        freeze: parameter-name prefixes to freeze (e.g. ``["patch_embed", "levels.0"]``) for layer-wise freezing.
        optim: optimizer settings (``configs/optim``); needed for training only.
        sched: schedule settings (``configs/sched``); needed for training only.
        mixup: timm ``Mixup`` arguments (``configs/data``'s ``mixup``) incl. ``label_smoothing``; None: plain
            cross-entropy.
        ema: ``enabled``, ``decay``, ``warmup``, ``evaluate`` (validate the EMA weights too, as ``val_ema/*``); None:
            no EMA.
        nonfinite_loss: ``"stop"`` raises on a NaN/Inf training loss; ``"skip"`` skips that step and counts it.
        channels_last: run the model in channels-last memory format.
        compile: ``torch.compile`` the model in :meth:`configure_model`: ``True`` (static shapes) or a dictionary of
            ``torch.compile`` arguments.
        loss: training loss (``train.yaml``'s ``loss``): ``name`` ``"ce"`` (cross-entropy, the default) or ``"bce"``
            (timm's ``BinaryCrossEntropy``: one sigmoid per class, on the same label-smoothed or mixup/cutmix
            targets; ``bce_target_threshold`` binarises them, ``bce_sum`` sums over classes). Validation reports
            cross-entropy either way.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        model_kwargs: dict | None = None,
        drop_path_rate: float | None = None,
        freeze: Sequence[str] = (),
        optim: dict | None = None,
        sched: dict | None = None,
        mixup: dict | None = None,
        ema: dict | None = None,
        nonfinite_loss: str = "stop",
        channels_last: bool = False,
        compile: bool | dict = False,
        loss: dict | None = None,
    ):
        super().__init__()
        arguments = {"model_name": model_name, "num_classes": num_classes, "model_kwargs": model_kwargs or {},
                         "drop_path_rate": drop_path_rate, "freeze": list(freeze), "nonfinite_loss": nonfinite_loss,
                         "channels_last": channels_last, "compile": compile}
        check_settings(arguments, _ARGUMENT_RULES, type(self).__name__)
        check_optim_settings(optim, sched)
        self.mixup_cfg = dict(mixup or {})
        check_settings(self.mixup_cfg, _MIXUP_RULES, "data.mixup")
        self.ema_cfg = dict(ema or {})
        check_settings(self.ema_cfg, _EMA_RULES, "ema")
        self.save_hyperparameters()
        self.num_classes = int(num_classes)
        self.model = create_model(model_name, self.num_classes, drop_path_rate, **(model_kwargs or {}))
        self._freeze(freeze)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model_ema = None
        if self.ema_cfg.get("enabled"):
            self.model_ema = ModelEmaV3(self.model, decay=float(self.ema_cfg["decay"]),
                                        use_warmup=bool(self.ema_cfg.get("warmup", False)))
            # The EMA copy only runs in validation, where Lightning puts every module in eval mode; in train mode
            # like the rest it does not trip Lightning's "modules in eval mode at the start of training" warning.
            self.model_ema.train()

        self.mixup_fn = None
        label_smoothing = float(self.mixup_cfg.get("label_smoothing", 0.0))
        loss_cfg = dict(loss or {})
        check_settings(loss_cfg, _LOSS_RULES, "loss")
        if _mixup_active(self.mixup_cfg):
            self.mixup_fn = Mixup(**self.mixup_cfg, num_classes=self.num_classes)
        self.train_loss: nn.Module
        if loss_cfg.get("name", "ce") == "bce":
            # With mixup the targets arrive smoothed already (Mixup applies label_smoothing), as in timm's train.py.
            self.train_loss = BinaryCrossEntropy(
                smoothing=0.0 if self.mixup_fn is not None else label_smoothing,
                target_threshold=loss_cfg.get("bce_target_threshold"), sum_classes=bool(loss_cfg.get("bce_sum")))
        elif self.mixup_fn is not None:
            self.train_loss = SoftTargetCrossEntropy()
        else:
            self.train_loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

        def accuracy(top_k: int) -> MulticlassAccuracy:
            return MulticlassAccuracy(self.num_classes, top_k=min(top_k, self.num_classes), average="micro")

        # One metric set per logged prefix: torchmetrics objects accumulate until Lightning resets them.
        self.eval_metrics = nn.ModuleDict({
            prefix: nn.ModuleDict({"acc1": accuracy(1), "acc5": accuracy(5)}) for prefix in ("val", "val_ema", "test")
        })
        self.train_acc1 = accuracy(1)
        self.confusion: MulticlassConfusionMatrix | None = None
        self.skipped_nonfinite = 0
        self.skipped_images = 0
        self._last_ema_step = -1
        self._compiled = False
        self._loaded_record: dict[str, Any] | None = None

    def _freeze(self, prefixes: Sequence[str]) -> None:
        for prefix in prefixes:
            params = [p for n, p in self.model.named_parameters() if n == prefix or n.startswith(prefix + ".")]
            if not params:
                top = sorted({n.split(".")[0] for n, _ in self.model.named_parameters()})
                # Lightning's hparams is an AttributeDict (typed as a plain mapping)
                raise ValueError(f"model.freeze: no parameter of {self.hparams.model_name} starts with {prefix!r} "  # type: ignore[attr-defined]
                                 f"(top-level names: {top})")
            for p in params:
                p.requires_grad_(False)

    def configure_model(self) -> None:
        """Compiles the model in place when ``compile`` is set (state-dict keys stay those of the plain model)."""
        # Lightning's hparams is an AttributeDict (typed as a plain mapping)
        if self.hparams.compile and not self._compiled:  # type: ignore[attr-defined]
            # Static shapes by default: the batch size takes only a few values (full, last, evaluation batches).
            # Lightning's hparams is an AttributeDict (typed as a plain mapping)
            options = {"dynamic": False} if self.hparams.compile is True else dict(self.hparams.compile)  # type: ignore[attr-defined]
            self.model.compile(**options)
            self._compiled = True

    def enable_confusion_matrix(self) -> None:
        """Accumulates a confusion matrix over the next validation run (read ``self.confusion.compute()``)."""
        self.confusion = MulticlassConfusionMatrix(self.num_classes).to(self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, 3, H, W]``."""
        # Lightning's hparams is an AttributeDict (typed as a plain mapping)
        if self.hparams.channels_last:  # type: ignore[attr-defined]
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        if len(batch) == 3:
            images, targets, skipped = batch
            return images, targets, int(skipped)
        images, targets = batch
        return images, targets, 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        """Mixup/cutmix, forward, loss; handles a non-finite loss according to ``nonfinite_loss``."""
        images, targets, skipped = self._unpack(batch)
        self._count_skipped_images(skipped, "train")
        if self.mixup_fn is not None and images.shape[0] % 2 == 1:
            images, targets = images[:-1], targets[:-1]  # batch-mode mixup pairs the batch with its flip
        if images.shape[0] == 0:
            return None
        hard_targets = targets
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        logits = self(images)
        loss = self.train_loss(logits, targets)
        finite = bool(torch.isfinite(loss).all())
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            where = f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
            # Lightning's hparams is an AttributeDict (typed as a plain mapping)
            if self.hparams.nonfinite_loss == "stop":  # type: ignore[attr-defined]
                raise FloatingPointError(
                    f"non-finite training loss ({loss.item()}) at {where}; lower optim.lr, check the data, or set "
                    "nonfinite_loss=skip to skip such steps"
                )
            self.skipped_nonfinite += 1
            log.warning("non-finite training loss at %s: step skipped (%d so far)", where, self.skipped_nonfinite)
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), on_step=True, on_epoch=False)
            return None
        batch_size = images.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=True)
        if self.mixup_fn is None:
            self.train_acc1(logits.detach(), hard_targets)
            self.log("train/acc1", self.train_acc1, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def _count_skipped_images(self, skipped: int, split: str) -> None:
        if skipped:
            self.skipped_images += skipped
            log.warning("%d unreadable %s image(s) skipped in this batch (%d in all)", skipped, split,
                        self.skipped_images)
            self.log(f"{split}/skipped_images", float(self.skipped_images), on_step=False, on_epoch=True,
                     reduce_fx="max")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Updates the EMA once per optimizer step (not per accumulated micro-batch)."""
        if self.model_ema is not None and self.global_step != self._last_ema_step:
            self._last_ema_step = self.global_step
            self.model_ema.update(self.model, step=self.global_step)

    def _evaluation_step(self, batch: Any, prefix: str) -> None:
        images, targets, skipped = self._unpack(batch)
        self._count_skipped_images(skipped, prefix)
        if images.shape[0] == 0:
            return
        logits = self(images)
        self._log_eval(prefix, logits, targets)
        if self.confusion is not None:
            self.confusion.update(logits, targets)
        if prefix == "val" and self.model_ema is not None and self.ema_cfg.get("evaluate", True):
            # Lightning's hparams is an AttributeDict (typed as a plain mapping)
            x = images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images  # type: ignore[attr-defined]
            self._log_eval("val_ema", self.model_ema(x), targets)

    def _log_eval(self, prefix: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
        batch_size = targets.shape[0]
        loss = F.cross_entropy(logits.float(), targets)
        self.log(f"{prefix}/loss", loss, on_epoch=True, batch_size=batch_size, sync_dist=True)
        # nn.Module.__getattr__ types submodules and buffers as Tensor | Module
        for name, metric in self.eval_metrics[prefix].items():  # type: ignore[operator]
            metric(logits, targets)
            self.log(f"{prefix}/{name}", metric, on_epoch=True, prog_bar=name == "acc1" and prefix == "val",
                     batch_size=batch_size)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Cross-entropy loss, top-1 and top-5 of the model (``val/*``) and of its EMA (``val_ema/*``)."""
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Cross-entropy loss, top-1 and top-5 of the model as ``test/*``."""
        self._evaluation_step(batch, "test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Records the model, its evaluation preprocessing and class names (taken from the trainer's data module) as
        ``checkpoint["natzoo_model"]`` (:mod:`natzoo.tools.model_info`); Lightning calls this for weights-only
        checkpoints too."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None and self._loaded_record is not None:
            checkpoint[RECORD_KEY] = self._loaded_record  # saved again outside a run: keep what it recorded
            return
        record = record_for_module(self.hparams, datamodule)
        if record is not None:
            checkpoint[RECORD_KEY] = record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keeps the checkpoint's ``natzoo_model`` record for a later save without a data module."""
        self._loaded_record = checkpoint.get(RECORD_KEY)

    # Lightning accepts this dict (its OptimizerLRSchedulerConfig); ours is typed as a plain dict
    def configure_optimizers(self) -> dict:  # type: ignore[override]
        """Optimizer over the single weight-decay rule's groups and the per-step schedule; see
        :func:`natzoo.optim.configure_optimizers`."""
        # Lightning's hparams is an AttributeDict (typed as a plain mapping)
        return configure_optimizers(self, self.model, self.hparams.optim, self.hparams.sched)  # type: ignore[attr-defined]
