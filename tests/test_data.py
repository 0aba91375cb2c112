"""Demo dataset generation/caching, folder-layout checks and unreadable-image handling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from natzoo.datasets import DEMO_CLASSES, ImageFolderDataModule, ensure_demo_dataset, generate_demo_dataset
from natzoo.datasets.folder import collate_skipping


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_demo_dataset_layout_and_determinism(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", train_per_class=3, val_per_class=2, img_size=24, seed=5)
    b = generate_demo_dataset(tmp_path / "b", train_per_class=3, val_per_class=2, img_size=24, seed=5)
    c = generate_demo_dataset(tmp_path / "c", train_per_class=3, val_per_class=2, img_size=24, seed=6)
    for split, count in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (a / split).iterdir()) == sorted(DEMO_CLASSES)
        for cls in DEMO_CLASSES:
            files = sorted((a / split / cls).iterdir())
            assert len(files) == count and all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
    assert _digest(a) == _digest(b)  # same seed: byte-identical files
    assert _digest(a) != _digest(c)
    manifest = json.loads((a / "MANIFEST.json").read_text())
    assert manifest["counts"] == {"train": 24, "val": 16} and manifest["seed"] == 5
    assert sorted(manifest["files"]) == sorted(str(p.relative_to(a).as_posix()) for p in a.rglob("*.png"))
    assert all(size == (a / rel).stat().st_size for rel, size in manifest["files"].items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no scratch folder left behind


def test_demo_images_vary_within_a_class(tmp_path):
    from PIL import Image

    root = generate_demo_dataset(tmp_path / "d", train_per_class=6, val_per_class=1, img_size=32)
    for cls in DEMO_CLASSES:
        arrays = [torch.tensor(np.asarray(Image.open(p)), dtype=torch.float32).flatten(0, 1)
                  for p in sorted((root / "train" / cls).iterdir())]
        means = torch.stack([a.mean(0) for a in arrays])  # [6, 3] mean colour per image
        assert means.std(0).max() > 10, f"{cls}: colours do not vary"


def test_ensure_reuses_complete_dataset_and_replaces_stale_one(tmp_path):
    root = tmp_path / "demo"
    ensure_demo_dataset(root, train_per_class=2, val_per_class=1, img_size=16)
    marker = (root / "MANIFEST.json").stat().st_mtime_ns
    ensure_demo_dataset(root, train_per_class=2, val_per_class=1, img_size=16)
    assert (root / "MANIFEST.json").stat().st_mtime_ns == marker  # not regenerated
    ensure_demo_dataset(root, train_per_class=3, val_per_class=1, img_size=16)
    assert len(list((root / "train" / "circle").iterdir())) == 3  # other parameters: regenerated


def test_ensure_refuses_foreign_directory(tmp_path):
    root = tmp_path / "mine"
    (root / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds files but no MANIFEST.json.*use data=folder"):
        ensure_demo_dataset(root, train_per_class=2, val_per_class=1, img_size=16)
    assert (root / "train").is_dir()  # left alone


def _datamodule(root: Path, bad_images: str) -> ImageFolderDataModule:
    return ImageFolderDataModule(root, img_size=16, batch_size=4, num_workers=0, pin_memory=False,
                                 eval_transform={"crop_pct": 1.0}, bad_images=bad_images, persistent_workers=False)


def test_unreadable_image_error_or_skip(tmp_path):
    root = generate_demo_dataset(tmp_path / "d", train_per_class=2, val_per_class=2, img_size=16)
    bad = root / "val" / "checker" / "00001.png"
    bad.write_bytes(b"not a png at all")

    dm = _datamodule(root, "error")
    dm.setup("validate")
    with pytest.raises(RuntimeError, match=f"cannot read image file {bad}"):
        list(dm.val_dataloader())

    dm = _datamodule(root, "skip")
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert sum(b[2] for b in batches) == 1  # one file skipped and counted
    assert sum(b[0].shape[0] for b in batches) == 2 * len(DEMO_CLASSES) - 1


def test_collate_skipping_all_missing():
    images, targets, skipped = collate_skipping([None, None])
    assert images.numel() == 0 and targets.numel() == 0 and skipped == 2


def test_datamodule_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"data\.batch_size must be >= 1, got 0"):
        ImageFolderDataModule(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match=r"data\.bad_images must be one of"):
        ImageFolderDataModule(tmp_path, bad_images="ignore")
