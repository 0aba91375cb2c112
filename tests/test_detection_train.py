"""Faster/Mask R-CNN with a small NAT backbone: a Lightning training and evaluation step on the generated dataset,
mAP plumbing, the optimizer groups and LR schedule of the official COCO configs, and composition of the detection
configs."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from natzoo.config import plain
from natzoo.datasets.coco import CocoDataModule
from natzoo.detection.module import DetectionModule
from natzoo.optim import param_groups, warmup_step_factor
from natzoo.testing import compose_config

SYNTH = {"num_train": 4, "num_val": 2, "image_size": 48, "min_shape_size": 12, "max_shape_size": 20, "seed": 1}
DETECTOR = {
    "backbone": "nat_mini", "num_classes": 4, "embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8),
    "fpn_channels": 32, "min_size": 48, "max_size": 48, "anchor_sizes": (8, 16, 32, 64, 128),
    "representation_size": 64, "mask_head_channels": 16,
    "detector_kwargs": {"box_batch_size_per_image": 16, "rpn_post_nms_top_n_train": 100, "rpn_post_nms_top_n_test": 50},
}


def _demo_settings(tmp_path) -> tuple[dict, dict]:
    cfg = compose_config("train", ["experiment=detection_demo"], tmp_path)
    return plain(cfg.optim), dict(plain(cfg.sched), warmup_steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["fasterrcnn", "maskrcnn"])
def test_train_and_eval_step(arch, tmp_path):
    dm = CocoDataModule(synthetic=SYNTH, cache_dir=str(tmp_path), batch_size=2, num_workers=0,
                        with_masks=arch == "maskrcnn")
    optim, sched = _demo_settings(tmp_path)
    module = DetectionModule(dict(DETECTOR, arch=arch), optim=optim, sched=sched)
    before = module.model.backbone.body.levels[0].blocks[0].attn.qkv.weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, dm)
    after = module.model.backbone.body.levels[0].blocks[0].attn.qkv.weight
    assert not torch.equal(before, after)  # the backbone was updated by the step
    metrics = trainer.callback_metrics
    expected_losses = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    if arch == "maskrcnn":
        expected_losses.add("loss_mask")
    logged = {k.split("/", 1)[1] for k in metrics if k.startswith("train/loss_")} - {"loss_step", "loss_epoch"}
    assert logged == expected_losses
    assert torch.isfinite(metrics["train/loss_epoch"])  # the summed loss, per step and per epoch
    iou_types = ["bbox", "segm"] if arch == "maskrcnn" else ["bbox"]
    for iou in iou_types:
        assert 0.0 <= float(metrics[f"val/{iou}_mAP"]) <= 1.0
    assert ("val/segm_mAP" in metrics) == (arch == "maskrcnn")


def test_map_of_ground_truth_predictions_is_one(tmp_path):
    dm = CocoDataModule(synthetic=SYNTH, cache_dir=str(tmp_path), batch_size=2, num_workers=0)
    dm.setup("validate")
    module = DetectionModule(dict(DETECTOR, arch="maskrcnn"))
    for images, targets in dm.val_dataloader():
        outputs = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                    "masks": t["masks"][:, None].float()} for t in targets]
        module.val_map.update(*module._metric_inputs(outputs, targets))
    result = module.val_map.compute()
    assert float(result["bbox_map"]) == pytest.approx(1.0)
    assert float(result["segm_map"]) == pytest.approx(1.0)


def test_weight_decay_groups_follow_official_custom_keys(tmp_path):
    from natzoo.detection.detectors import build_detector

    model = build_detector("fasterrcnn", **{k: v for k, v in DETECTOR.items()})
    optim, _ = _demo_settings(tmp_path)
    no_decay, decay = param_groups(model, 0.05, optim["no_decay_1d"], optim["no_decay_rpb"], optim["no_decay_names"])
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert "backbone.body.levels.0.blocks.0.attn.rpb" in no_decay_names
    assert "backbone.body.norm2.weight" in no_decay_names and "backbone.body.patch_embed.norm.bias" in no_decay_names
    assert "backbone.body.levels.1.downsample.norm.weight" in no_decay_names
    # Biases keep decay under mmcv's custom_keys (no bias_decay_mult in the configs).
    assert "backbone.body.levels.0.blocks.0.attn.qkv.bias" in decay_names
    assert all("rpb" not in n and "norm" not in n for n in decay_names)


def test_warmup_and_step_schedule_values():
    # The mmcv formulas written out (an independent check of natzoo.optim.warmup_step_factor).
    # Linear warmup: 1 - (1 - i / 500) * (1 - 0.001); steps x0.1 at epochs 27 and 33.
    args = {"steps_per_epoch": 1000, "milestones": (27, 33), "milestone_unit": "epoch", "gamma": 0.1,
            "warmup_steps": 500, "warmup_ratio": 0.001}
    assert warmup_step_factor(0, **args) == pytest.approx(0.001)
    assert warmup_step_factor(250, **args) == pytest.approx(1 - 0.5 * 0.999)
    assert warmup_step_factor(500, **args) == pytest.approx(1.0)
    assert warmup_step_factor(26_999, **args) == pytest.approx(1.0)
    assert warmup_step_factor(27_000, **args) == pytest.approx(0.1)
    assert warmup_step_factor(33_000, **args) == pytest.approx(0.01)
    assert warmup_step_factor(7, **dict(args, milestone_unit="step", milestones=(5,))) == pytest.approx(0.1 * (
        1 - (1 - 7 / 500) * 0.999))


@pytest.mark.parametrize("overrides", [
    ["experiment=detection_demo"],
    ["experiment=detection_coco", "model.name=dinat_s_small", "data.root=/data/coco"],
    ["experiment=detection_coco", "model=detection_fasterrcnn", "model.name=nat_tiny"],
])
def test_detection_configs_compose(overrides, tmp_path):

    from natzoo.detection.task import detector_config

    cfg = compose_config("train", overrides, tmp_path)
    assert cfg.task == "detection"
    det = detector_config(cfg, 80)
    assert det["num_classes"] == 81 and det["arch"] in ("maskrcnn", "fasterrcnn")
    if "experiment=detection_coco" in overrides:
        assert det["dilations"] == "coco" and det["min_size"][-1] == 800 and det["max_size"] == 1333
        assert cfg.optim.lr == 1e-4 and list(cfg.sched.milestones) == [27, 33] and cfg.sched.warmup_steps == 500
        assert cfg.sched.epochs == 36 and cfg.trainer.strategy == "ddp"
    if "model.name=dinat_s_small" in overrides:
        assert cfg.data.train_images == "/data/coco/train2017"


@pytest.mark.slow
def test_detection_run_plots_its_own_metrics(tmp_path):
    # train.py's curve plot knows the task's metrics: loss and mAP curves, validation points only where it ran.
    from natzoo import train
    from natzoo.plots import plot_curves
    from natzoo.run.tasks import get_task

    overrides = [
        "experiment=detection_demo", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}",
        "data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.image_size=48",
        "data.synthetic.min_shape_size=12", "data.synthetic.max_shape_size=20", "data.batch_size=2",
        "sched.epochs=2", "sched.milestones=[1]", "sched.warmup_steps=1", "trainer.check_val_every_n_epoch=2",
        "logger=csv", "callbacks=none", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
    ]
    result = train(compose_config("train", overrides, tmp_path / "run"))
    callbacks = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)["callbacks"]
    history = next(state["history"] for key, state in callbacks.items() if key.startswith("CurvePlot"))
    assert [row["epoch"] for row in history] == [0, 1]
    assert "train/loss_epoch" in history[0] and not any(k.startswith("val") for k in history[0])
    assert {"val/bbox_mAP", "val/segm_mAP"} <= history[1].keys()
    drawn = plot_curves(history, tmp_path / "curves.png", get_task("detection").curves)
    assert drawn == {"loss": 1, "mAP (%)": 4}
    assert Path(result["curves"]).read_bytes()[:4] == b"\x89PNG"
