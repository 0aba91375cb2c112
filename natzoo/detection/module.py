"""LightningModule for torchvision detectors: optimizer and schedule from the shared settings, COCO mAP evaluation."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from natzoo.detection.detectors import build_detector
from natzoo.optim import check_optim_settings, configure_optimizers
from natzoo.rules import Flag, Number, check_settings

__all__ = ["DetectionModule"]

_ARGUMENT_RULES = {"with_masks": Flag(nullable=True), "mask_threshold": Number(0.0, 1.0)}


class DetectionModule(pl.LightningModule):
    """Trains and evaluates a torchvision detector (``FasterRCNN``/``MaskRCNN`` built by ``build_detector``).

    Same conventions as :class:`natzoo.classification.ClassificationModule`: the optimizer and schedule come from the
    ``optim``/``sched`` settings of ``configs/`` (:func:`natzoo.optim.configure_optimizers`; the COCO recipes use
    AdamW with no decay for parameter names containing ``rpb`` or ``norm`` and mmcv's linear warmup + step schedule,
    see ``configs/optim/detection_adamw.yaml`` and ``configs/sched/detection_3x.yaml``), and every argument is a
    plain value saved with the checkpoint. Evaluation computes COCO box mAP (and mask mAP for Mask R-CNN) with
    torchmetrics' ``MeanAveragePrecision`` (pycocotools backend), logged as ``val/bbox_mAP``, ``val/bbox_mAP_50``,
    ... (``test/*`` from ``test_step``).

    Args:
        detector: Keyword arguments of :func:`natzoo.detection.detectors.build_detector` (stored in the checkpoint's
            hyper-parameters, so ``load_from_checkpoint`` rebuilds the model), or a built detector module.
        optim: Optimizer settings (``configs/optim``); needed for training only.
        sched: Schedule settings (``configs/sched``); needed for training only.
        with_masks: Also evaluate mask mAP; None means "if the detector is a Mask R-CNN".
        mask_threshold: Probability threshold turning predicted mask logits into binary masks.
    """

    def __init__(
        self,
        detector: dict[str, Any] | nn.Module,
        optim: dict[str, Any] | None = None,
        sched: dict[str, Any] | None = None,
        with_masks: bool | None = None,
        mask_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        check_settings({"with_masks": with_masks, "mask_threshold": mask_threshold}, _ARGUMENT_RULES,
                       type(self).__name__)
        check_optim_settings(optim, sched)
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
        # iou_types holds 'bbox' and 'segm' only
        self.val_map = MeanAveragePrecision(iou_type=iou_types, backend="pycocotools")  # type: ignore[arg-type]
        # iou_types holds 'bbox' and 'segm' only
        self.test_map = MeanAveragePrecision(iou_type=iou_types, backend="pycocotools")  # type: ignore[arg-type]

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections for a list of ``[3, H, W]`` images in ``[0, 1]`` (the model must be in eval mode)."""
        return self.model(images)

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> torch.Tensor:
        """Sum of the detector's losses (each also logged as ``train/<name>``)."""
        images, targets = batch
        targets = [self._train_target(t) for t in targets]
        losses = self.model(images, targets)
        loss = sum(losses.values())
        batch_size = len(images)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=True)
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
                # [N, H, W] bool. (Lightning's hparams is an AttributeDict, typed as a plain mapping.)
                pred["masks"] = out["masks"][:, 0] > self.hparams.mask_threshold  # type: ignore[attr-defined]
                gt["masks"] = tgt["masks"].as_subclass(torch.Tensor).bool()
            preds.append(pred)
            gts.append(gt)
        return preds, gts

    def validation_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> None:
        """Accumulates the batch's detections for the epoch's ``val/*`` mAP."""
        images, targets = batch
        self.val_map.update(*self._metric_inputs(self.model(images), targets))

    def test_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> None:
        """Accumulates the batch's detections for the epoch's ``test/*`` mAP."""
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
        """Logs ``val/*`` mAP."""
        self._log_map(self.val_map, "val")

    def on_test_epoch_end(self) -> None:
        """Logs ``test/*`` mAP."""
        self._log_map(self.test_map, "test")

    # Lightning accepts this dict (its OptimizerLRSchedulerConfig); ours is typed as a plain dict
    def configure_optimizers(self) -> dict[str, Any]:  # type: ignore[override]
        """Optimizer and per-step schedule from the ``optim``/``sched`` settings; see
        :func:`natzoo.optim.configure_optimizers`."""
        # Lightning's hparams is an AttributeDict (typed as a plain mapping)
        return configure_optimizers(self, self.model, self.hparams.optim, self.hparams.sched)  # type: ignore[attr-defined]
