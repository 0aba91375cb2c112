"""COCO-format detection data: annotation validation, dataset, transforms, collate and a Lightning data module."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from natzoo.datasets.coco_shapes import SyntheticCocoSpec, make_synthetic_coco

__all__ = [
    "CocoDataModule",
    "CocoDetectionDataset",
    "count_boxes",
    "detection_collate",
    "load_coco_annotations",
    "train_transforms",
    "val_transforms",
]

log = logging.getLogger(__name__)

_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox")
_CATEGORY_FIELDS = ("id", "name")


def _first(items: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in list(items)[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def load_coco_annotations(annotation_file: str | os.PathLike, image_dir: str | os.PathLike,
                          require_masks: bool) -> dict:
    """Read a COCO instances JSON and check it before any training starts.

    Checks the top-level lists, the required fields of every image, annotation and category, that annotations
    reference existing images and categories, that every referenced image file exists under ``image_dir``, and
    (if ``require_masks``) that every annotation has a ``segmentation``.

    Args:
        annotation_file: Path of the JSON file.
        image_dir: Directory the images' ``file_name`` entries are relative to.
        require_masks: Whether the annotations must carry segmentations (Mask R-CNN).

    Returns:
        The parsed JSON dictionary.

    Raises:
        FileNotFoundError: If the JSON, the image directory or any image file is missing (the message lists them).
        ValueError: If the JSON is malformed or lacks required fields (the message names the field and entry).
    """
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    if not annotation_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"COCO image directory not found: {image_dir} (for {annotation_file})")
    try:
        with open(annotation_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{annotation_file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):  # a malformed file, not a wrong argument type
        raise ValueError(  # noqa: TRY004
f"{annotation_file}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(  # noqa: TRY004
f"{annotation_file}: required top-level list {key!r} is missing or not a list")
    if not data["categories"]:
        raise ValueError(f"{annotation_file}: 'categories' is empty")

    fields = [("images", _IMAGE_FIELDS), ("annotations", _ANNOTATION_FIELDS), ("categories", _CATEGORY_FIELDS)]
    if require_masks:
        fields[1] = ("annotations", _ANNOTATION_FIELDS + ("segmentation",))
    for key, required in fields:
        for index, entry in enumerate(data[key]):
            missing = [name for name in required if not isinstance(entry, dict) or name not in entry]
            if missing:
                raise ValueError(
                    f"{annotation_file}: {key}[{index}] lacks required field(s) {missing}"
                    + (" (segmentations are needed for Mask R-CNN)" if "segmentation" in missing else "")
                )

    image_ids = {image["id"] for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    for index, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{annotation_file}: annotations[{index}] refers to unknown image_id {ann['image_id']!r}")
        if ann["category_id"] not in category_ids:
            raise ValueError(
                f"{annotation_file}: annotations[{index}] refers to unknown category_id {ann['category_id']!r}"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"{annotation_file}: annotations[{index}].bbox must be [x, y, w, h], got {bbox!r}")

    missing_files = [image["file_name"] for image in data["images"] if not (image_dir / image["file_name"]).is_file()]
    if missing_files:
        raise FileNotFoundError(
            f"{annotation_file}: {len(missing_files)} image file(s) not found under {image_dir}: "
            f"{_first(missing_files)}"
        )
    return data


def count_boxes(data: dict, annotation_file: str | os.PathLike, split: str,
                image_dir: str | os.PathLike | None = None) -> dict[str, int]:
    """Counts the non-crowd boxes the transforms keep and those they drop, by reason; logs the dropped ones.

    A box ``[x, y, w, h]`` is dropped when a value is not finite, when ``w`` or ``h`` is not positive, or when nothing
    of it lies inside its image.

    Returns:
        ``{"kept": n, "not finite": n, "empty or negative size": n, "outside the image": n}``.

    With ``image_dir``, images with boxes outside them are opened (their header only) and a size that differs from
    the file's ``width``/``height`` is named in the report: boxes then look outside because the image entry is wrong.

    Raises:
        ValueError: the split has annotations but no valid box (training would end at mAP 0), naming split and file.
    """
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    counts = {"kept": 0, "not finite": 0, "empty or negative size": 0, "outside the image": 0}
    outside: list[int] = []
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        width, height = sizes[ann["image_id"]]
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            counts["not finite"] += 1
        elif w <= 0 or h <= 0:
            counts["empty or negative size"] += 1
        elif min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0):
            counts["outside the image"] += 1
            outside.append(ann["image_id"])
        else:
            counts["kept"] += 1
    dropped = sum(counts.values()) - counts["kept"]
    if dropped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in counts.items() if n and reason != "kept")
        if image_dir is not None and outside:
            reasons += _size_mismatches(data, image_dir, list(dict.fromkeys(outside))[:3])
        log.warning("%s split (%s): %d of %d boxes are dropped (%s)", split, annotation_file, dropped,
                    dropped + counts["kept"], reasons)
    if dropped and not counts["kept"]:
        raise ValueError(f"{split} split ({annotation_file}): no valid box among {dropped} ({reasons}); fix the "
                         "annotations (COCO bbox is [x, y, width, height] in pixels)")
    return counts


def _size_mismatches(data: dict, image_dir: str | os.PathLike, image_ids: list[int]) -> str:
    """``"; image a.jpg is 640x480 on disk but the annotation file says 64x48, ..."`` for the given images whose
    file has another size than their entry (empty when they agree or cannot be opened)."""
    from PIL import Image

    entries = {image["id"]: image for image in data["images"]}
    found = []
    for image_id in image_ids:
        entry = entries[image_id]
        try:
            with Image.open(Path(image_dir) / entry["file_name"]) as image:
                real = image.size  # (width, height), from the header
        except OSError:
            continue
        if real != (entry["width"], entry["height"]):
            found.append(f"image {entry['file_name']} is {real[0]}x{real[1]} on disk but the annotation file says "
                         f"{entry['width']}x{entry['height']}")
    return ("; " + "; ".join(found) + " (fix the images' width and height)") if found else ""


class _PreparsedCocoDetection(CocoDetection):
    """torchvision's ``CocoDetection`` built from an already validated annotation dictionary."""

    def __init__(self, root: str | os.PathLike, annotations: dict, image_ids: list[int]) -> None:
        from pycocotools.coco import COCO

        # torchvision annotates str | Path; it only joins the path
        super(CocoDetection, self).__init__(root)  # type: ignore[arg-type]
        self.coco = COCO()
        self.coco.dataset = annotations
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.ids = image_ids


class CocoDetectionDataset(Dataset):
    """A COCO-format dataset yielding ``(image [3, H, W] float in [0, 1], target dict)`` for torchvision detectors.

    Targets hold ``boxes`` (XYXY, absolute pixels), ``labels`` (contiguous ``1..K``; 0 is the background of
    torchvision's detectors), ``image_id``, ``iscrowd`` and, with ``with_masks``, ``masks`` ``[N, H, W]`` uint8.
    COCO category ids are mapped to contiguous labels in the order of the JSON's ``categories`` list.

    Args:
        image_dir: Directory of the images.
        annotation_file: COCO instances JSON.
        transforms: A ``torchvision.transforms.v2`` transform applied to ``(image, target)``.
        with_masks: Decode segmentations into masks.
        train: Drop crowd annotations (as torchvision's reference scripts do) and, with ``filter_empty``, images
            without any non-crowd annotation.
        filter_empty: See ``train``.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transforms: Any = None,
        with_masks: bool = False,
        train: bool = False,
        filter_empty: bool = True,
    ) -> None:
        data = load_coco_annotations(annotation_file, image_dir, require_masks=with_masks)
        self.box_counts = count_boxes(data, annotation_file, "train" if train else "val", image_dir)
        self.category_ids = [category["id"] for category in data["categories"]]
        self.category_names = [category["name"] for category in data["categories"]]
        self.cat_to_label = {cat_id: label + 1 for label, cat_id in enumerate(self.category_ids)}
        image_ids = sorted(image["id"] for image in data["images"])
        if train and filter_empty:
            keep = {ann["image_id"] for ann in data["annotations"] if not ann.get("iscrowd", 0)}
            image_ids = [image_id for image_id in image_ids if image_id in keep]
            if not image_ids:
                raise ValueError(f"{annotation_file}: no image has a non-crowd annotation")
        base = _PreparsedCocoDetection(image_dir, data, image_ids)
        keys = ("image_id", "boxes", "labels", "iscrowd") + (("masks",) if with_masks else ())
        self.dataset = wrap_dataset_for_transforms_v2(base, target_keys=keys)
        self.image_ids = image_ids
        self.transforms = transforms
        self.with_masks = with_masks
        self.train = train

    @property
    def num_classes(self) -> int:
        """Number of foreground categories ``K`` (the detectors get ``K + 1`` with the background)."""
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.dataset[index]
        height, width = TF.get_size(image)
        if "boxes" not in target:
            # The torchvision wrapper returns only the image id for an image without annotations.
            target["boxes"] = tv_tensors.BoundingBoxes(
                torch.zeros(0, 4), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)
            )
            target["labels"] = torch.zeros(0, dtype=torch.int64)
            target["iscrowd"] = []
            if self.with_masks:
                target["masks"] = tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8))
        target["labels"] = torch.tensor([self.cat_to_label[int(c)] for c in target["labels"]], dtype=torch.int64)
        target["iscrowd"] = torch.as_tensor(target["iscrowd"], dtype=torch.bool).reshape(-1)
        if self.train:
            keep = ~target["iscrowd"]
            for key in ("boxes", "labels", "iscrowd") + (("masks",) if self.with_masks else ()):
                value = target[key]
                # Boolean indexing returns a plain tensor; re-wrap to keep the BoundingBoxes/Mask type for v2.
                kept = value[keep]
                target[key] = tv_tensors.wrap(kept, like=value) if isinstance(value, tv_tensors.TVTensor) else kept
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def train_transforms() -> v2.Transform:
    """Standard training transform: horizontal flip (0.5), float image, drop degenerate boxes.

    Resizing (multi-scale via a tuple ``min_size``) and ImageNet normalisation happen inside torchvision's
    detector (``GeneralizedRCNNTransform``), which also pads batches to a multiple of 32.
    """
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomHorizontalFlip(0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.SanitizeBoundingBoxes(labels_getter=_labels_and_crowd),
        ]
    )


def val_transforms() -> v2.Transform:
    """Evaluation transform: float image only (the detector resizes and normalises)."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def _labels_and_crowd(sample: Any) -> tuple[torch.Tensor, torch.Tensor]:
    target = sample[1]
    return target["labels"], target["iscrowd"]


def detection_collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep variable-size images as a list; torchvision's detector batches and pads them itself."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class CocoDataModule(pl.LightningDataModule):
    """Lightning data module for COCO-format detection datasets, or the generated shapes demo.

    With ``synthetic`` set, the shapes dataset (:mod:`natzoo.datasets.coco_shapes`) is generated in
    ``prepare_data`` (cached under ``cache_dir``) and the four paths are taken from it.

    Args:
        train_images: Training image directory.
        train_annotations: Training COCO JSON.
        val_images: Validation image directory (also used for ``test``).
        val_annotations: Validation COCO JSON.
        with_masks: Load masks (needed by Mask R-CNN and for mask mAP).
        batch_size: Images per device per step.
        eval_batch_size: Images per device in evaluation (default ``batch_size``).
        num_workers: DataLoader workers.
        pin_memory: DataLoader ``pin_memory``.
        filter_empty: Drop training images without non-crowd annotations (mmdet's ``filter_empty_gt``).
        synthetic: Parameters of :class:`SyntheticCocoSpec` to use the generated demo dataset instead of paths.
        cache_dir: Parent directory of the generated dataset (default ``$NATZOO_CACHE`` or ``~/.cache/natzoo``).
    """

    def __init__(
        self,
        train_images: str | None = None,
        train_annotations: str | None = None,
        val_images: str | None = None,
        val_annotations: str | None = None,
        with_masks: bool = True,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        filter_empty: bool = True,
        synthetic: dict | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.synthetic = SyntheticCocoSpec(**dict(synthetic)) if synthetic is not None else None
        if self.synthetic is None:
            paths = {
                "train_images": train_images,
                "train_annotations": train_annotations,
                "val_images": val_images,
                "val_annotations": val_annotations,
            }
            unset = [name for name, value in paths.items() if not value]
            if unset:
                raise ValueError(f"CocoDataModule needs {unset} (or `synthetic` for the generated demo dataset)")
        self.paths = {
            "train": (train_images, train_annotations),
            "val": (val_images, val_annotations),
        }
        self.cache_dir = cache_dir
        self.with_masks = with_masks
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.filter_empty = filter_empty
        self.train_set: CocoDetectionDataset | None = None
        self.val_set: CocoDetectionDataset | None = None

    def _resolve_synthetic(self) -> None:
        root = make_synthetic_coco(self.synthetic, self.cache_dir)
        self.paths = {split: (str(root / split), str(root / "annotations" / f"instances_{split}.json")) for split in
                      ("train", "val")}

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            make_synthetic_coco(self.synthetic, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.synthetic is not None:
            self._resolve_synthetic()
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = CocoDetectionDataset(
                # the paths are set: checked in __init__, or resolved just above for `synthetic`
                *self.paths["train"], train_transforms(), self.with_masks, train=True, filter_empty=self.filter_empty  # type: ignore[arg-type]
            )
        if self.val_set is None:
            # the paths are set: checked in __init__, or resolved just above for `synthetic`
            self.val_set = CocoDetectionDataset(*self.paths["val"], val_transforms(), self.with_masks, train=False)  # type: ignore[arg-type]

    @property
    def num_classes(self) -> int:
        """Foreground categories of the validation annotations (call after ``setup``)."""
        if self.val_set is None:
            raise RuntimeError("CocoDataModule.num_classes is known only after setup()")
        return self.val_set.num_classes

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            collate_fn=detection_collate,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        # the dataset is set by setup(), which Lightning calls before any loader
        return self._loader(self.train_set, self.batch_size, shuffle=True)  # type: ignore[arg-type]

    def val_dataloader(self) -> DataLoader:
        # the dataset is set by setup(), which Lightning calls before any loader
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)  # type: ignore[arg-type]

    def test_dataloader(self) -> DataLoader:
        # the dataset is set by setup(), which Lightning calls before any loader
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)  # type: ignore[arg-type]
