"""The training knobs people bring from timm's train.py: layer-wise lr decay, gradient checkpointing, the BCE loss and
repeated augmentation, each against an independent expectation, then all of them in one short training run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import natzoo.models  # noqa: F401  (registers the NAT families with timm)
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import one_thread  # noqa: F401

from natzoo import train
from natzoo.classification.module import ClassificationModule
from natzoo.datasets import ensure_demo_dataset
from natzoo.datasets.samplers import RepeatAugmentSampler
from natzoo.optim import configure_optimizers, param_groups
from natzoo.strategies import enable_grad_checkpointing
from natzoo.testing import compose_config, tiny_overrides

TINY = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "kernel_size": 3}
OPTIM = {"name": "adamw", "lr": 1e-3, "scale_lr": False, "lr_base_batch": 1024, "weight_decay": 0.05,
         "betas": [0.9, 0.999], "eps": 1e-8, "momentum": 0.9, "no_decay_1d": True, "no_decay_rpb": True,
         "no_decay_names": []}
SCHED = {"name": "constant", "epochs": 2, "warmup_epochs": 0, "warmup_lr": 1e-6, "min_lr": 1e-5}


def _tiny_nat(num_classes: int = 3) -> torch.nn.Module:
    return timm.create_model("nat_mini", num_classes=num_classes, **TINY)


# Depth order of a 4-stage NAT under its group_matcher: the stem, then per stage its blocks and its downsampler (the
# last stage has none; the final norm goes with its blocks), the head last.
DEPTH = {"patch_embed": 0, "levels.0.blocks": 1, "levels.0.downsample": 2, "levels.1.blocks": 3,
         "levels.1.downsample": 4, "levels.2.blocks": 5, "levels.2.downsample": 6, "levels.3.blocks": 7, "norm": 7,
         "head": 8}


def _depth(name: str) -> int:
    return next(d for prefix, d in sorted(DEPTH.items(), key=lambda kv: -len(kv[0])) if name.startswith(prefix))


def test_layer_decay_scales_each_depth_and_keeps_the_decay_rule():
    model = _tiny_nat()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05, layer_decay=0.5)
    seen = set()
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            assert group["lr_scale"] == 0.5 ** (8 - _depth(name)), name
            exempt = p.ndim <= 1 or name.endswith("rpb")
            assert group["weight_decay"] == (0.0 if exempt else 0.05), name
    assert seen == set(names.values())  # every parameter once


def _fake_trainer(batches: int = 4) -> SimpleNamespace:
    return SimpleNamespace(estimated_stepping_batches=batches * 2, num_training_batches=batches, max_epochs=2,
                           accumulate_grad_batches=1, world_size=1, datamodule=SimpleNamespace(batch_size=8))


def test_layer_decay_optimizer_lrs_follow_the_schedule_per_depth():
    model = _tiny_nat()
    module = SimpleNamespace(trainer=_fake_trainer())
    sched = dict(SCHED, name="cosine", warmup_epochs=1, warmup_lr=1e-4)
    config = configure_optimizers(module, model, dict(OPTIM, layer_decay=0.5), sched)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    plain = configure_optimizers(module, _tiny_nat(), OPTIM, sched)
    reference = plain["optimizer"], plain["lr_scheduler"]["scheduler"]
    for _ in range(5):  # into the cosine part: warmup is 4 steps
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(reference[0].param_groups[0]["lr"] * group["lr_scale"], rel=1e-12)
        optimizer.step()
        scheduler.step()
        reference[0].step()
        reference[1].step()
    assert {g["lr_scale"] for g in optimizer.param_groups} == {0.5 ** k for k in range(9)}


def test_layer_decay_config_rule(tmp_path):
    from natzoo.config import COMMON_RULES, check_config

    cfg = compose_config("train", ["optim.layer_decay=1.5"], tmp_path)
    with pytest.raises(ValueError, match=r"optim.layer_decay=1.5: expected a finite number in \(0, 1\]"):
        check_config(cfg, COMMON_RULES)


def _spy_checkpoint(monkeypatch) -> list:
    from natzoo.models import nat

    calls = []
    real = nat.checkpoint

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(nat, "checkpoint", spy)
    return calls


def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(monkeypatch):
    calls = _spy_checkpoint(monkeypatch)
    torch.manual_seed(0)
    # No stochastic depth: the two models must compute the same function.
    module = ClassificationModule("nat_mini", 3, model_kwargs=TINY, drop_path_rate=0.0,
                                  ema={"enabled": True, "decay": 0.9})
    twin = ClassificationModule("nat_mini", 3, model_kwargs=TINY, drop_path_rate=0.0)
    twin.model.load_state_dict(module.model.state_dict())
    assert enable_grad_checkpointing(module) == ["model"]  # the EMA copy is left alone
    assert not any(s.grad_checkpointing for s in module.model_ema.module.stages)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    F.cross_entropy(module(x), y).backward()
    assert len(calls) == 4  # one call per block (depths 1, 1, 1, 1)
    F.cross_entropy(twin(x), y).backward()
    assert len(calls) == 4
    for (name, p), q in zip(module.model.named_parameters(), twin.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_grad_checkpointing_reaches_the_detection_backbone(monkeypatch):
    from natzoo.detection import build_detector

    calls = _spy_checkpoint(monkeypatch)
    detector = build_detector("fasterrcnn", backbone="nat_mini", num_classes=3, min_size=64, max_size=64,
                              embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], kernel_size=3)
    assert enable_grad_checkpointing(detector) == ["backbone.body"]
    detector.train()
    target = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    losses = detector([torch.rand(3, 64, 64)], [target])
    sum(losses.values()).backward()
    assert len(calls) == 4


def test_grad_checkpointing_needs_a_model_that_supports_it():
    with pytest.raises(ValueError, match="model.grad_checkpointing=true: Linear holds no model"):
        enable_grad_checkpointing(torch.nn.Linear(2, 2))


def test_bce_loss_matches_binary_cross_entropy_on_smoothed_one_hot_targets():
    module = ClassificationModule("nat_mini", 4, model_kwargs=TINY, mixup={"label_smoothing": 0.1},
                                  loss={"name": "bce", "bce_target_threshold": None, "bce_sum": False})
    logits, targets = torch.randn(3, 4), torch.tensor([0, 3, 1])
    # Smoothing 0.1 over 4 classes: 0.025 off target, 0.925 on target; mean over every element.
    expected_targets = torch.full((3, 4), 0.025)
    expected_targets[torch.arange(3), targets] = 0.925
    expected = F.binary_cross_entropy_with_logits(logits, expected_targets)
    torch.testing.assert_close(module.train_loss(logits, targets), expected)


def test_bce_loss_with_mixup_binarises_soft_targets_at_the_threshold():
    mixup = {"mixup_alpha": 0.8, "cutmix_alpha": 0.0, "cutmix_minmax": None, "prob": 1.0, "switch_prob": 0.5,
             "mode": "batch", "label_smoothing": 0.1}
    module = ClassificationModule("nat_mini", 4, model_kwargs=TINY, mixup=mixup,
                                  loss={"name": "bce", "bce_target_threshold": 0.2, "bce_sum": True})
    logits = torch.randn(2, 4)
    soft = torch.tensor([[0.6, 0.3, 0.05, 0.05], [0.05, 0.15, 0.75, 0.05]])
    hard = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    # bce_sum: summed over the classes, averaged over the batch.
    expected = F.binary_cross_entropy_with_logits(logits, hard, reduction="none").sum(1).mean()
    torch.testing.assert_close(module.train_loss(logits, soft), expected)


def test_bce_loss_rejects_unknown_names():
    with pytest.raises(ValueError, match="loss.name='focal'"):
        ClassificationModule("nat_mini", 4, model_kwargs=TINY, loss={"name": "focal"})


def test_repeated_augmentation_gives_each_process_its_own_copy_of_the_same_images():
    dataset = list(range(12))
    samplers = [RepeatAugmentSampler(dataset, num_replicas=3, rank=r, num_repeats=3) for r in range(3)]
    for sampler in samplers:
        sampler.set_epoch(5)
    drawn = [list(s) for s in samplers]
    assert drawn[0] == drawn[1] == drawn[2]  # image i is augmented once on each of the three processes
    assert len(drawn[0]) == 4 and len(set(drawn[0])) == 4  # one pass over the dataset, split across 3 processes
    samplers[0].set_epoch(6)
    assert list(samplers[0]) != drawn[0]  # a new order each epoch
    assert isinstance(samplers[0], torch.utils.data.DistributedSampler)  # Lightning uses it as it is


def test_repeated_augmentation_on_one_process_repeats_each_image_k_times():
    sampler = RepeatAugmentSampler(list(range(10)), num_replicas=1, rank=0, num_repeats=2)
    drawn = list(sampler)
    assert len(drawn) == 10
    assert all(drawn[i] == drawn[i + 1] for i in range(0, 10, 2))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "demo"
    return ensure_demo_dataset(root, train_per_class=8, val_per_class=4, img_size=32, seed=0)


def _lightning_checkpoint(path: Path, state: dict, epoch: int) -> Path:
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.6.0", "epoch": epoch, "global_step": 10 * epoch,
                "hyper_parameters": {"model_name": "nat_mini"}, "optimizer_states": [{"state": {}}]}, path)
    return path


def test_average_checkpoints_is_the_elementwise_mean(tmp_path):
    from natzoo.tools.averaging import average_checkpoints

    states = [{"w": torch.randn(3, 4), "h": torch.randn(2).half(), "count": torch.tensor(k)} for k in range(3)]
    paths = [_lightning_checkpoint(tmp_path / f"e{k}.ckpt", s, k) for k, s in enumerate(states)]
    out = average_checkpoints(paths, tmp_path / "avg.ckpt")
    averaged = torch.load(out, weights_only=True)
    expected_w = (states[0]["w"].double() + states[1]["w"].double() + states[2]["w"].double()) / 3
    torch.testing.assert_close(averaged["state_dict"]["w"], expected_w.float())
    assert averaged["state_dict"]["h"].dtype == torch.float16
    torch.testing.assert_close(averaged["state_dict"]["h"],
                               ((states[0]["h"].double() + states[1]["h"].double() + states[2]["h"].double()) / 3).half())
    assert int(averaged["state_dict"]["count"]) == 0  # integers: the first checkpoint's
    assert "optimizer_states" not in averaged and averaged["averaged_from"] == [str(p) for p in paths]


def test_average_checkpoints_refuses_different_models_and_overwriting_an_input(tmp_path):
    from natzoo.tools.averaging import average_checkpoints

    a = _lightning_checkpoint(tmp_path / "a.ckpt", {"w": torch.zeros(3)}, 0)
    b = _lightning_checkpoint(tmp_path / "b.ckpt", {"w": torch.zeros(4)}, 1)
    with pytest.raises(ValueError, match=r"w has shape \(4,\), checkpoint 0 \(3,\)"):
        average_checkpoints([a, b], tmp_path / "out.ckpt")
    with pytest.raises(ValueError, match="is one of the inputs"):
        average_checkpoints([a, a], a)
    assert not (tmp_path / "out.ckpt").exists()


def test_timm_layout_rebuilds_the_model_with_its_head_and_preprocessing(tmp_path):
    from natzoo.tools.timm_export import save_timm_model

    model = _tiny_nat(num_classes=5).eval()
    data = {"input_size": (3, 48, 48), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2), "crop_pct": 1.0,
            "interpolation": "bilinear"}
    folder = save_timm_model(model, tmp_path / "export", data, label_names=list("abcde"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    resolved = timm.data.resolve_data_config(model=rebuilt)
    assert resolved["input_size"] == (3, 48, 48) and resolved["crop_pct"] == 1.0
    assert resolved["interpolation"] == "bilinear" and tuple(resolved["mean"]) == (0.5, 0.4, 0.3)
    assert rebuilt.pretrained_cfg["label_names"] == list("abcde")

    save_timm_model(model, folder, data)  # its own folder is replaced as a whole
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        save_timm_model(model, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="label_names has 2 names but the model has 5 classes"):
        save_timm_model(model, tmp_path / "x", label_names=["a", "b"])


@pytest.mark.slow
def test_training_with_every_knob_on(demo_root, tmp_path, monkeypatch):
    calls = _spy_checkpoint(monkeypatch)
    overrides = [o for o in tiny_overrides(demo_root, tmp_path / "logs", epochs=3) if o != "callbacks=none"] + [
        "optim.layer_decay=0.75", "model.grad_checkpointing=true", "loss.name=bce",
        "loss.bce_target_threshold=0.2", "data.aug_repeats=2", "data.mixup.mixup_alpha=0.8",
        "callbacks.average_checkpoints.top_k=2", "callbacks.progress_bar=null", "callbacks.timm_model.enabled=true",
    ]
    result = train(compose_config("train", overrides, tmp_path / "run"))
    assert calls  # the blocks ran under checkpointing
    checkpoints = Path(result["output_dir"]) / "checkpoints"
    kept = sorted((checkpoints / "top").glob("*.ckpt"))
    assert len(kept) == 2
    averaged = torch.load(checkpoints / "averaged.ckpt", weights_only=True)
    assert sorted(averaged["averaged_from"]) == [str(p) for p in kept]
    states = [torch.load(p, weights_only=True)["state_dict"] for p in kept]
    key = "model.head.weight"
    torch.testing.assert_close(averaged["state_dict"][key], (states[0][key] + states[1][key]) / 2)
    module = ClassificationModule.load_from_checkpoint(checkpoints / "averaged.ckpt", weights_only=True)
    assert module.hparams.loss["name"] == "bce" and module.num_classes == 8

    # The best checkpoint's model in timm's layout, with the run's 32-px preprocessing and the demo's class names.
    best = ClassificationModule.load_from_checkpoint(result["best_checkpoint"], weights_only=True).model.eval()
    rebuilt = timm.create_model(f"local-dir:{Path(result['output_dir']) / 'timm_model'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), best(x), rtol=0, atol=0)
    assert timm.data.resolve_data_config(model=rebuilt)["input_size"] == (3, 32, 32)
    assert rebuilt.pretrained_cfg["label_names"] == sorted(p.name for p in (demo_root / "train").iterdir())
