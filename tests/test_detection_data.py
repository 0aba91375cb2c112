"""Generated COCO shapes dataset, COCO JSON validation, data module, metric inputs and the LR schedule."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pycocotools import mask as mask_utils

from natzoo.datasets.coco import CocoDataModule, CocoDetectionDataset, detection_collate, load_coco_annotations
from natzoo.datasets.coco_shapes import SHAPE_CATEGORIES, SyntheticCocoSpec, make_synthetic_coco

SPEC = SyntheticCocoSpec(num_train=6, num_val=3, image_size=48, min_shape_size=10, max_shape_size=20, seed=3)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return make_synthetic_coco(SPEC, tmp_path_factory.mktemp("cache"))


def test_generation_is_deterministic_and_cached(shapes_root, tmp_path):
    again = make_synthetic_coco(SPEC, tmp_path)
    for rel in ("annotations/instances_train.json", "annotations/instances_val.json", "train/000001.png"):
        assert (again / rel).read_bytes() == (shapes_root / rel).read_bytes()
    stamp = (again / "train" / "000001.png").stat().st_mtime_ns
    assert make_synthetic_coco(SPEC, tmp_path) == again
    assert (again / "train" / "000001.png").stat().st_mtime_ns == stamp
    other = make_synthetic_coco(SyntheticCocoSpec(**{**SPEC.__dict__, "seed": 4}), tmp_path)
    assert other != again
    assert (other / "train/000001.png").read_bytes() != (again / "train/000001.png").read_bytes()


def test_generated_annotations_are_consistent(shapes_root):
    data = json.loads((shapes_root / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPE_CATEGORIES)
    assert len(data["images"]) == SPEC.num_train
    per_image = {}
    for ann in data["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
        # The polygon rasterised by pycocotools covers the stored box (to a pixel) and has about the stored area.
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], SPEC.image_size, SPEC.image_size))
        x, y, w, h = mask_utils.toBbox(rle)
        assert abs(x - ann["bbox"][0]) <= 1 and abs(y - ann["bbox"][1]) <= 1
        assert abs(x + w - ann["bbox"][0] - ann["bbox"][2]) <= 1 and abs(y + h - ann["bbox"][1] - ann["bbox"][3]) <= 1
        assert abs(float(mask_utils.area(rle)) - ann["area"]) <= 0.15 * ann["area"] + 4
    assert all(SPEC.min_objects <= n <= SPEC.max_objects for n in per_image.values())
    assert len(per_image) == SPEC.num_train


def test_dataset_targets_and_collate(shapes_root):
    ds = CocoDetectionDataset(shapes_root / "val", shapes_root / "annotations" / "instances_val.json",
                              with_masks=True)
    from natzoo.datasets.coco import val_transforms

    ds.transforms = val_transforms()
    image, target = ds[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    n = len(target["labels"])
    assert target["boxes"].shape == (n, 4) and target["masks"].shape == (n, 48, 48)
    assert target["labels"].min() >= 1 and target["labels"].max() <= len(SHAPE_CATEGORIES)
    # Each mask lies inside its (XYXY) box.
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() <= box[3] + 1
    images, targets = detection_collate([ds[0], ds[1]])
    assert len(images) == 2 and len(targets) == 2 and targets[1]["image_id"] == ds.image_ids[1]


def test_datamodule_synthetic_setup(tmp_path):
    dm = CocoDataModule(synthetic=SPEC.__dict__, cache_dir=str(tmp_path), batch_size=2, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 3
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == 2 and all(t["boxes"].shape[0] >= 1 for t in targets)


def _write_broken(shapes_root, tmp_path, edit):
    data = json.loads((shapes_root / "annotations" / "instances_val.json").read_text())
    edit(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_json_missing_required_field(shapes_root, tmp_path):
    path = _write_broken(shapes_root, tmp_path, lambda d: d["annotations"][1].pop("bbox"))
    with pytest.raises(ValueError, match=r"annotations\[1\] lacks required field\(s\) \['bbox'\]"):
        load_coco_annotations(path, shapes_root / "val", require_masks=False)
    path = _write_broken(shapes_root, tmp_path, lambda d: d.pop("categories"))
    with pytest.raises(ValueError, match="categories"):
        load_coco_annotations(path, shapes_root / "val", require_masks=False)
    path = _write_broken(shapes_root, tmp_path, lambda d: d["annotations"][0].pop("segmentation"))
    with pytest.raises(ValueError, match="segmentation"):
        CocoDetectionDataset(shapes_root / "val", path, with_masks=True)


def test_coco_json_pointing_at_missing_images(shapes_root, tmp_path):
    image_dir = tmp_path / "images"
    shutil.copytree(shapes_root / "val", image_dir)
    (image_dir / "000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="000002.png"):
        CocoDetectionDataset(image_dir, shapes_root / "annotations" / "instances_val.json")


def test_datamodule_requires_paths():
    with pytest.raises(ValueError, match="val_annotations"):
        CocoDataModule(train_images="a", train_annotations="b", val_images="c")
