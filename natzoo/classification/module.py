"""LightningModule for image classification with any timm-registered model (NAT/DiNAT by default)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from natzoo import models  # noqa: F401  (registers the NAT families with timm)
from natzoo.optim import build_lr_lambda, build_optimizer, param_groups_weight_decay, scaled_lr

__all__ = ["ClassificationModule", "NONFINITE_POLICIES", "create_model"]

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("stop", "skip")

_OPTIM_DEFAULTS = dict(name="adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, momentum=0.9,
                       scale_lr=False, lr_base_batch=1024, no_decay_1d=True, no_decay_rpb=True, no_decay_names=())
_SCHED_DEFAULTS = dict(name="cosine", epochs=300, cooldown_epochs=10, warmup_epochs=20, warmup_lr=1e-6, min_lr=5e-6)
_MIXUP_DEFAULTS = dict(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5, mode="batch",
                       label_smoothing=0.0)
_EMA_DEFAULTS = dict(enabled=False, decay=0.9998, warmup=False, evaluate=True)


def create_model(name: str, num_classes: int, drop_path_rate: Optional[float] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a readable error for unknown names; ``drop_path_rate=None`` keeps the default."""
    if not timm.is_model(name):
        close = [m for m in timm.list_models() if name.split("_")[0] in m][:8]
        raise ValueError(f"model.name={name!r} is not a registered timm model (close names: {close})")
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = float(drop_path_rate)
    return timm.create_model(name, num_classes=num_classes, **kwargs)


class ClassificationModule(pl.LightningModule):
    """Classification with mixup/cutmix, label smoothing, AdamW, warmup + per-step cosine, EMA and top-1/top-5.

    Every constructor argument is a plain Python value saved with ``save_hyperparameters``, so a checkpoint loads
    without Hydra: ``ClassificationModule.load_from_checkpoint(path, weights_only=True)``.

    Args:
        model_name: timm registry name (e.g. ``nat_mini``).
        num_classes: classifier outputs.
        model_kwargs: keyword arguments overriding the variant's architecture (``embed_dim``, ``depths``, ...).
        drop_path_rate: stochastic depth; None keeps the variant's default.
        freeze: parameter-name prefixes to freeze (e.g. ``["patch_embed", "levels.0"]``) for layer-wise freezing.
        optim: optimizer settings (see ``configs/optim``).
        sched: schedule settings (see ``configs/sched``).
        mixup: timm ``Mixup`` settings and ``label_smoothing``.
        ema: ``enabled``, ``decay``, ``warmup``, ``evaluate`` (validate the EMA weights too, as ``val_ema/*``).
        nonfinite_loss: ``"stop"`` raises on a NaN/Inf training loss; ``"skip"`` skips that step and counts it.
        channels_last: run the model in channels-last memory format.
        compile: wrap the forward in ``torch.compile``.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int,
        model_kwargs: Optional[dict] = None,
        drop_path_rate: Optional[float] = None,
        freeze: Sequence[str] = (),
        optim: Optional[dict] = None,
        sched: Optional[dict] = None,
        mixup: Optional[dict] = None,
        ema: Optional[dict] = None,
        nonfinite_loss: str = "stop",
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_loss must be one of {NONFINITE_POLICIES}, got {nonfinite_loss!r}")
        self.save_hyperparameters()
        self.optim_cfg = {**_OPTIM_DEFAULTS, **(optim or {})}
        self.sched_cfg = {**_SCHED_DEFAULTS, **(sched or {})}
        self.mixup_cfg = {**_MIXUP_DEFAULTS, **(mixup or {})}
        self.ema_cfg = {**_EMA_DEFAULTS, **(ema or {})}
        self.num_classes = int(num_classes)
        self.model = create_model(model_name, self.num_classes, drop_path_rate, **(model_kwargs or {}))
        self._freeze(freeze)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model_ema = None
        if self.ema_cfg["enabled"]:
            self.model_ema = ModelEmaV3(self.model, decay=float(self.ema_cfg["decay"]),
                                        use_warmup=bool(self.ema_cfg["warmup"]))

        m = self.mixup_cfg
        self.mixup_fn = None
        if (m["mixup_alpha"] > 0 or m["cutmix_alpha"] > 0 or m["cutmix_minmax"] is not None) and m["prob"] > 0:
            self.mixup_fn = Mixup(
                mixup_alpha=m["mixup_alpha"], cutmix_alpha=m["cutmix_alpha"], cutmix_minmax=m["cutmix_minmax"],
                prob=m["prob"], switch_prob=m["switch_prob"], mode=m["mode"], label_smoothing=m["label_smoothing"],
                num_classes=self.num_classes,
            )
            self.train_loss = SoftTargetCrossEntropy()
        else:
            self.train_loss = nn.CrossEntropyLoss(label_smoothing=float(m["label_smoothing"]))

        top5 = min(5, self.num_classes)
        self.val_metrics = nn.ModuleDict({
            "acc1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
            "acc5": MulticlassAccuracy(self.num_classes, top_k=top5, average="micro"),
        })
        self.val_ema_metrics = nn.ModuleDict({k: v.clone() for k, v in self.val_metrics.items()})
        self.train_acc1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self.confusion: Optional[MulticlassConfusionMatrix] = None
        self.skipped_nonfinite = 0
        self.skipped_images = 0
        self.eval_model_seconds = 0.0
        self.eval_images = 0
        self._last_ema_step = -1
        self._compiled = None

    def _freeze(self, prefixes: Sequence[str]) -> None:
        for prefix in prefixes:
            params = [p for n, p in self.model.named_parameters() if n == prefix or n.startswith(prefix + ".")]
            if not params:
                top = sorted({n.split(".")[0] for n, _ in self.model.named_parameters()})
                raise ValueError(f"model.freeze: no parameter of {self.hparams.model_name} starts with {prefix!r} "
                                 f"(top-level names: {top})")
            for p in params:
                p.requires_grad_(False)

    def enable_confusion_matrix(self) -> None:
        """Accumulates a confusion matrix over the next validation run (read ``self.confusion.compute()``)."""
        self.confusion = MulticlassConfusionMatrix(self.num_classes).to(self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, 3, H, W]``."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.hparams.compile:
            if self._compiled is None:
                # Kept out of the module tree so the state dict keeps the plain model's keys; static shapes, since
                # the batch size takes only a few values (full batches, an epoch's last batch, eval batches).
                self.__dict__["_compiled"] = torch.compile(self.model, dynamic=False)
            return self._compiled(x)
        return self.model(x)

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        if len(batch) == 3:
            images, targets, skipped = batch
            return images, targets, int(skipped)
        images, targets = batch
        return images, targets, 0

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
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
            if self.hparams.nonfinite_loss == "stop":
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

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Cross-entropy loss, top-1 and top-5 of the model (and of its EMA, as ``val_ema/*``)."""
        images, targets, skipped = self._unpack(batch)
        self._count_skipped_images(skipped, "val")
        if images.shape[0] == 0:
            return
        synchronize = images.is_cuda
        if synchronize:
            torch.cuda.synchronize(images.device)
        start = time.perf_counter()
        logits = self(images)
        if synchronize:
            torch.cuda.synchronize(images.device)
        self.eval_model_seconds += time.perf_counter() - start
        self.eval_images += images.shape[0]
        self._log_eval("val", logits, targets, self.val_metrics)
        if self.confusion is not None:
            self.confusion.update(logits, targets)
        if self.model_ema is not None and self.ema_cfg["evaluate"]:
            x = images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images
            self._log_eval("val_ema", self.model_ema(x), targets, self.val_ema_metrics)

    def _log_eval(self, prefix: str, logits: torch.Tensor, targets: torch.Tensor, metrics: nn.ModuleDict) -> None:
        batch_size = targets.shape[0]
        loss = F.cross_entropy(logits.float(), targets)
        self.log(f"{prefix}/loss", loss, on_epoch=True, batch_size=batch_size, sync_dist=True)
        for name, metric in metrics.items():
            metric(logits, targets)
            self.log(f"{prefix}/{name}", metric, on_epoch=True, prog_bar=name == "acc1" and prefix == "val",
                     batch_size=batch_size)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Same as :meth:`validation_step`."""
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> dict:
        """AdamW over decay/no-decay groups and a per-step LambdaLR (linear warmup, cosine, cooldown at min_lr)."""
        o, s = self.optim_cfg, self.sched_cfg
        total_steps = self.trainer.estimated_stepping_batches
        if math.isinf(self.trainer.num_training_batches):
            self.trainer.fit_loop.setup_data()  # estimated_stepping_batches skips it when max_steps is set
        accumulate = self.trainer.accumulate_grad_batches
        steps_per_epoch = max(1, math.ceil(self.trainer.num_training_batches / accumulate))
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None) or 1
        global_batch = int(batch_size) * self.trainer.world_size * accumulate
        lr = scaled_lr(o["lr"], global_batch, int(o["lr_base_batch"]), bool(o["scale_lr"]))
        groups = param_groups_weight_decay(self.model, o["weight_decay"], bool(o["no_decay_1d"]),
                                           bool(o["no_decay_rpb"]), tuple(o["no_decay_names"] or ()))
        optimizer = build_optimizer(o["name"], groups, lr, o["betas"], o["eps"], o["momentum"])
        warmup_steps = int(round(float(s["warmup_epochs"]) * steps_per_epoch))
        decay_steps = int(round(float(s["epochs"]) * steps_per_epoch))
        log.info("optimizer %s: lr %.3g (global batch %d%s), %d warmup + %d decay steps of %d, %d steps/epoch",
                 o["name"], lr, global_batch, ", scaled" if o["scale_lr"] else "", warmup_steps, decay_steps,
                 int(total_steps), steps_per_epoch)
        factor = build_lr_lambda(s["name"], lr, float(s["warmup_lr"]), float(s["min_lr"]), warmup_steps, decay_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
