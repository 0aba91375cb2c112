"""Lightning module for torchvision detectors: AdamW, linear warmup + step schedule, COCO mAP evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from natzoo.detection.detectors import build_detector
from natzoo.optim import param_groups_weight_decay

__all__ = ["DetectionModule", "detection_param_groups", "warmup_step_factor"]


def detection_param_groups(model: nn.Module, weight_decay: float, no_decay_keys: Sequence[str]) -> list[dict]:
    """AdamW groups of the official detection configs: no decay for names containing any of ``no_decay_keys``.

    mmcv's ``custom_keys`` match substrings of the full parameter name (``rpb``, ``norm``); biases and other 1-D
    parameters keep the decay because the configs set no ``bias_decay_mult`` (spec 4.3). Frozen parameters are left
    out.
    """
    return param_groups_weight_decay(
        model, weight_decay, no_decay_1d=False, no_decay_rpb=False, no_decay_names=tuple(no_decay_keys)
    )


def warmup_step_factor(
    step: int, steps_per_epoch: int, milestones: Sequence[int], milestone_unit: str, gamma: float,
    warmup_steps: int, warmup_ratio: float,
) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): mmcv's linear warmup times a step decay.

    Warmup (mmcv ``warmup='linear'``): ``1 - (1 - step / warmup_steps) * (1 - warmup_ratio)`` for
    ``step < warmup_steps``. Step decay: ``gamma ** n`` with ``n`` the number of milestones already reached, where a
    milestone in epochs is reached at the first step of that (0-based) epoch, as mmcv's epoch-based ``step`` policy.

    Args:
        step: Optimizer step.
        steps_per_epoch: Optimizer steps per epoch (used when ``milestone_unit == "epoch"``).
        milestones: Epochs (or steps) at which the LR is multiplied by ``gamma``.
        milestone_unit: ``"epoch"`` or ``"step"``.
        gamma: Decay per milestone.
        warmup_steps: Warmup length in steps (0 disables warmup).
        warmup_ratio: Factor at step 0.
    """
    position = step // max(1, steps_per_epoch) if milestone_unit == "epoch" else step
    factor = gamma ** sum(position >= m for m in milestones)
    if step < warmup_steps:
        factor *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return factor


class DetectionModule(L.LightningModule):
    """Trains and evaluates a torchvision detector (``FasterRCNN``/``MaskRCNN`` built by ``build_detector``).

    Optimisation follows the official NAT/DiNAT mmdet configs (spec 4.3): AdamW with betas (0.9, 0.999) and weight
    decay 0.05, except for parameters whose names contain ``rpb`` or ``norm`` (biases keep decay, as mmcv's
    ``custom_keys`` do); LR 1e-4 with a 500-step linear warmup from ratio 0.001 and x0.1 steps at epochs 27 and 33
    (the 3x schedule). Evaluation computes COCO box mAP (and mask mAP for Mask R-CNN) with torchmetrics'
    ``MeanAveragePrecision`` (pycocotools backend), logged as ``val/bbox_mAP``, ``val/bbox_mAP_50``, ...

    Args:
        detector: Keyword arguments of :func:`natzoo.detection.detectors.build_detector` (stored in the checkpoint's
            hyper-parameters, so ``load_from_checkpoint`` rebuilds the model), or a built detector module.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        no_decay_keys: Substrings of parameter names exempt from weight decay.
        warmup_steps: Linear warmup steps.
        warmup_ratio: LR factor at the first step.
        milestones: LR decay points.
        milestone_unit: ``"epoch"`` (the official configs) or ``"step"``.
        gamma: Decay factor per milestone.
        with_masks: Also evaluate mask mAP; None means "if the detector is a Mask R-CNN".
        mask_threshold: Probability threshold turning predicted mask logits into binary masks.
        category_ids: COCO category id of each contiguous label ``1..K`` (for result files); optional.
    """

    def __init__(
        self,
        detector: dict[str, Any] | nn.Module,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.999),
        no_decay_keys: Sequence[str] = ("rpb", "norm"),
        warmup_steps: int = 500,
        warmup_ratio: float = 0.001,
        milestones: Sequence[int] = (27, 33),
        milestone_unit: str = "epoch",
        gamma: float = 0.1,
        with_masks: bool | None = None,
        mask_threshold: float = 0.5,
        category_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if milestone_unit not in ("epoch", "step"):
            raise ValueError(f"milestone_unit must be 'epoch' or 'step', got {milestone_unit!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if warmup_steps < 0 or not 0 < warmup_ratio <= 1:
            raise ValueError(f"need warmup_steps >= 0 and 0 < warmup_ratio <= 1, got {warmup_steps}, {warmup_ratio}")
        if isinstance(detector, nn.Module):
            self.save_hyperparameters(ignore=["detector"])
            model = detector
        else:
            self.save_hyperparameters()
            model = build_detector(**dict(detector))
        has_masks = getattr(getattr(model, "roi_heads", None), "mask_head", None) is not None
        if with_masks is None:
            with_masks = has_masks
        if with_masks and not has_masks:
            raise ValueError("with_masks=True needs a Mask R-CNN (the model has no mask head)")
        self.with_masks = bool(with_masks)
        self.train_masks = has_masks
        self.model = model
        iou_types = ("bbox", "segm") if with_masks else ("bbox",)
        self.val_map = MeanAveragePrecision(iou_type=iou_types, backend="pycocotools")
        self.test_map = MeanAveragePrecision(iou_type=iou_types, backend="pycocotools")

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections for a list of ``[3, H, W]`` images in ``[0, 1]`` (the model must be in eval mode)."""
        return self.model(images)

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        targets = [self._train_target(t) for t in targets]
        losses = self.model(images, targets)
        loss = sum(losses.values())
        batch_size = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=False)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss

    def _train_target(self, target: dict) -> dict:
        keys = ("boxes", "labels", "masks") if self.train_masks else ("boxes", "labels")
        return {k: target[k] for k in keys if k in target}

    def _metric_inputs(self, outputs: list[dict], targets: list[dict]) -> tuple[list[dict], list[dict]]:
        preds, gts = [], []
        for out, tgt in zip(outputs, targets):
            pred = {"boxes": out["boxes"].float(), "scores": out["scores"].float(), "labels": out["labels"]}
            gt = {"boxes": tgt["boxes"].as_subclass(torch.Tensor).float(), "labels": tgt["labels"],
                  "iscrowd": tgt["iscrowd"].to(torch.uint8)}
            if self.with_masks:
                pred["masks"] = out["masks"][:, 0] > self.hparams.mask_threshold  # [N, H, W] bool
                gt["masks"] = tgt["masks"].as_subclass(torch.Tensor).bool()
            preds.append(pred)
            gts.append(gt)
        return preds, gts

    def validation_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> None:
        images, targets = batch
        self.val_map.update(*self._metric_inputs(self.model(images), targets))

    def test_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> None:
        images, targets = batch
        self.test_map.update(*self._metric_inputs(self.model(images), targets))

    def _log_map(self, metric: MeanAveragePrecision, stage: str) -> None:
        results = metric.compute()
        metric.reset()
        iou_types = ("bbox", "segm") if self.with_masks else ("bbox",)
        names = {"map": "mAP", "map_50": "mAP_50", "map_75": "mAP_75", "map_small": "mAP_s", "map_medium": "mAP_m",
                 "map_large": "mAP_l"}
        for iou_type in iou_types:
            prefix = f"{iou_type}_" if len(iou_types) > 1 else ""
            for key, short in names.items():
                value = results[f"{prefix}{key}"]
                self.log(f"{stage}/{iou_type}_{short}", value.float(), prog_bar=key == "map", sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = detection_param_groups(self.model, hp.weight_decay, hp.no_decay_keys)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        steps_per_epoch = 1
        if hp.milestone_unit == "epoch":
            max_epochs = self.trainer.max_epochs
            if max_epochs is None or max_epochs < 1:
                raise ValueError("milestone_unit='epoch' needs trainer.max_epochs; use milestone_unit='step' with max_steps")
            steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // max_epochs)
        args = (steps_per_epoch, tuple(hp.milestones), hp.milestone_unit, hp.gamma, hp.warmup_steps, hp.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_step_factor(step, *args))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
