"""Evaluation from weight files (official-format flat state dicts) against an independent accuracy computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision import transforms
from torchvision.datasets import ImageFolder

from natzoo import (
    evaluate,
    models,  # noqa: F401
)
from natzoo.datasets import ensure_demo_dataset
from natzoo.testing import compose_config

TINY = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2), "kernel_size": 3}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "demo"
    return ensure_demo_dataset(root, train_per_class=8, val_per_class=4, img_size=32)


def _eval_overrides(demo_root: Path, *extra: str) -> list[str]:
    return [f"data.root={demo_root}", "data.generate.train_per_class=8", "data.generate.val_per_class=4",
            "model.kwargs.embed_dim=16", "model.kwargs.depths=[1,1,1,1]", "model.kwargs.num_heads=[1,1,2,2]",
            "+model.kwargs.kernel_size=3", "+trainer.enable_progress_bar=false", *extra]


def _reference_metrics(model: torch.nn.Module, root: Path) -> tuple[float, float, float]:
    """Top-1 %, top-5 %, mean cross-entropy over <root>/val, computed with plain torchvision + a loop.

    The demo images are already 32 px and crop_pct is 1.0, so the eval transform is ToTensor + Normalize.
    """
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    dataset = ImageFolder(str(root / "val"), to_input)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = torch.tensor(dataset.targets)
    model.eval()
    with torch.no_grad():
        logits = model(images)
    top1 = (logits.argmax(1) == targets).double().mean().item() * 100
    top5 = (logits.topk(5, dim=1).indices == targets[:, None]).any(1).double().mean().item() * 100
    return top1, top5, F.cross_entropy(logits, targets).item()


def test_eval_official_format_checkpoint(demo_root, tmp_path):
    torch.manual_seed(3)
    model = timm.create_model("nat_mini", num_classes=8, **TINY)
    # Make the random model non-trivial: perturb the head so predictions spread over classes.
    with torch.no_grad():
        model.head.weight.mul_(50)
    path = tmp_path / "nat_tiny_demo.pth"
    torch.save(model.state_dict(), path)  # flat state dict, as the official files are
    cfg = compose_config("eval", _eval_overrides(demo_root, f"checkpoint={path}", f"output={tmp_path / 'r.json'}"),
                         tmp_path / "eval")
    result = evaluate(cfg)

    top1, top5, loss = _reference_metrics(model, demo_root)
    assert result["top1"] == pytest.approx(top1, abs=1e-6)
    assert result["top5"] == pytest.approx(top5, abs=1e-6)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["num_images"] == 32 and result["images_per_second"] > 0
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["top1"] == result["top1"] and written["source"]["checkpoint"] == str(path)
    assert Path(written["confusion_matrix_png"]).read_bytes()[:4] == b"\x89PNG"


def test_eval_checkpoint_with_other_class_count_is_rejected(demo_root, tmp_path):
    model = timm.create_model("nat_mini", num_classes=10, **TINY)
    path = tmp_path / "ten_classes.pth"
    torch.save({"model": model.state_dict()}, path)
    cfg = compose_config("eval", _eval_overrides(demo_root, f"checkpoint={path}"), tmp_path / "eval")
    expected = r"classifier head\.weight has shape \(10, 128\) but the model expects \(8, 128\)"
    with pytest.raises(ValueError, match=expected):
        evaluate(cfg)


def test_eval_wrong_variant_is_rejected(demo_root, tmp_path):
    model = timm.create_model("nat_mini", num_classes=8, **dict(TINY, embed_dim=32))
    path = tmp_path / "wide.pth"
    torch.save(model.state_dict(), path)
    cfg = compose_config("eval", _eval_overrides(demo_root, f"checkpoint={path}"), tmp_path / "eval")
    with pytest.raises(ValueError, match=r"tensors have other shapes than the model"):
        evaluate(cfg)


def test_eval_bare_timm_name(demo_root, tmp_path):
    cfg = compose_config("eval", [f"data.root={demo_root}", "data.generate.train_per_class=8",
                                  "data.generate.val_per_class=4", "model=timm", "model.name=resnet10t",
                                  "random_weights=true", "+trainer.enable_progress_bar=false",
                                  "confusion_matrix=false"], tmp_path / "eval")
    result = evaluate(cfg)
    assert result["source"]["model"] == "resnet10t" and result["num_images"] == 32
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
    assert "confusion_matrix" not in result


def test_eval_missing_files_fail_fast(demo_root, tmp_path):
    cfg = compose_config("eval", _eval_overrides(demo_root, "ckpt_path=/nope/best.ckpt"), tmp_path / "eval")
    with pytest.raises(ValueError, match=r"ckpt_path='/nope/best.ckpt' does not exist"):
        evaluate(cfg)
    cfg = compose_config("eval", _eval_overrides(demo_root, "checkpoint=/nope/w.pth"), tmp_path / "eval")
    with pytest.raises(ValueError, match=r"checkpoint='/nope/w.pth' does not exist"):
        evaluate(cfg)


def test_eval_preprocessing_comes_from_the_models_pretrained_config(demo_root, tmp_path):
    # timm's test_vit takes exactly 160 px (crop_pct 0.95, mean/std 0.5). data=folder leaves size, crop and mean/std
    # unset, so evaluation must use the model's values; the reference applies timm's own pipeline for the model.
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(5)
    model = timm.create_model("test_vit", num_classes=8)
    path = tmp_path / "vit.pth"
    torch.save(model.state_dict(), path)
    overrides = ["data=folder", f"data.root={demo_root}", "data.num_workers=0", "data.persistent_workers=false",
                 "model=timm", "model.name=test_vit", f"checkpoint={path}", "confusion_matrix=false",
                 "+trainer.enable_progress_bar=false"]
    result = evaluate(compose_config("eval", overrides, tmp_path / "eval"))

    expected = resolve_data_config({}, model=model)
    assert result["preprocessing"] == {
        "img_size": expected["input_size"][-1], "mean": list(expected["mean"]), "std": list(expected["std"]),
        "crop_pct": expected["crop_pct"], "crop_mode": expected["crop_mode"],
        "interpolation": expected["interpolation"]}
    dataset = ImageFolder(str(demo_root / "val"), create_transform(**expected))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        loss = F.cross_entropy(model.eval()(images), torch.tensor(dataset.targets)).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)

    # A value set in the data config wins over the model's.
    chosen = evaluate(compose_config("eval", [*overrides, "data.eval_transform.crop_pct=1.0"], tmp_path / "eval2"))
    assert chosen["preprocessing"]["crop_pct"] == 1.0 and chosen["preprocessing"]["img_size"] == 160
