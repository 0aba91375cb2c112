"""Image-folder data module (ImageNet layout: ``<root>/<split>/<class>/<image>``) with timm transforms."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image
from lightning.pytorch.utilities import rank_zero_info
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = [
    "BAD_IMAGE_POLICIES",
    "ImageFolderDataModule",
    "RobustImageFolder",
    "check_image_folder_layout",
    "walk_class_folder",
]

BAD_IMAGE_POLICIES = ("error", "skip")

log = logging.getLogger(__name__)

# What reading one image may raise besides OSError/ValueError/SyntaxError: PIL refuses images with more than twice
# Image.MAX_IMAGE_PIXELS pixels (a decompression bomb) with this error.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _directory_key(path: str | os.PathLike) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _guarded_dirs(split_dir: Path) -> set[tuple[int, int]]:
    """The split folder and its ancestors: a symbolic link inside a class folder to any of them is a loop."""
    keys = set()
    for path in (split_dir, *split_dir.resolve().parents):
        try:
            keys.add(_directory_key(path))
        except OSError:
            continue
    return keys


def walk_class_folder(class_dir: str | os.PathLike, guarded: set[tuple[int, int]],
                      dataset_root: str | os.PathLike | None = None) -> Iterator[str]:
    """Paths of the files under ``class_dir`` in sorted order, following symbolic links to folders, but each folder
    once and never back into the data set: a link to a folder already walked, to one in ``guarded`` (the split
    folder and its ancestors: a loop), or to another folder under ``dataset_root`` (another class or split: its images
    would be counted twice, or leak from one split into another) is skipped with a warning.

    Raises:
        ValueError: a folder cannot be read (naming it).
    """
    seen = set(guarded)
    top = Path(class_dir)
    inside = Path(os.path.realpath(top))
    root = Path(os.path.realpath(dataset_root)) if dataset_root is not None else None
    stack = [top]
    while stack:
        folder = stack.pop()
        key = _directory_key(folder)
        if key in seen:
            log.warning("%s: skipped, a symbolic link to a folder that is already part of the data set (a loop "
                        "would repeat its images)", folder)
            continue
        real = Path(os.path.realpath(folder))
        if root is not None and real.is_relative_to(root) and not real.is_relative_to(inside):
            log.warning("%s: skipped, a symbolic link to %s, another part of the data set (its images would be "
                        "counted twice or leak into this class)", folder, real)
            continue
        seen.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise ValueError(f"cannot read folder {folder}: {err.strerror or err}") from None
        subfolders = []
        for entry in entries:
            if entry.is_dir():
                subfolders.append(Path(entry.path))
            elif entry.is_file():
                yield entry.path
        stack.extend(reversed(subfolders))


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def _check_class_folder(split: str, class_dir: Path, guarded: set[tuple[int, int]]) -> None:
    """Fails unless ``class_dir`` can be read and holds at least one image file (stops at the first one)."""
    try:
        found = any(_is_image(path) for path in walk_class_folder(class_dir, guarded, class_dir.parent.parent))
    except ValueError as err:
        raise ValueError(f"split {split!r}: class folder {class_dir}: {err}") from None
    if not found:
        raise ValueError(f"split {split!r}: class folder {class_dir} holds no image file (extensions "
                         f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder (every class folder of "
                         "a split is a class)")


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def check_image_folder_layout(root: str | Path, splits: Sequence[str]) -> list[str]:
    """Checks the ImageNet folder layout cheaply (directories only, no image is opened) and returns the class names.

    Args:
        root: dataset root holding one directory per split.
        splits: split directory names to check, e.g. ``("train", "val")``; the first one defines the classes.

    Raises:
        ValueError: the root or a split is missing, a split has no class directories, a class folder cannot be read
            or holds no image file, or the splits' class lists differ (each names the split and the path).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data.root={str(root)!r} does not exist or is not a directory")
    classes: list[str] | None = None
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise ValueError(
                f"data.root={str(root)!r} has no {split!r} directory (found {present}); expected the ImageNet layout"
                f" {root}/{split}/<class>/<image>"
            )
        try:
            found = _class_dirs(split_dir)
        except OSError as err:
            raise ValueError(f"split {split!r}: cannot read {split_dir}: {err.strerror or err}") from None
        if not found:
            raise ValueError(
                f"{split_dir} has no class sub-directories; expected the ImageNet layout {split_dir}/<class>/<image>"
                " (images directly inside the split directory are not supported)"
            )
        if classes is None:
            classes = found
        elif found != classes:
            extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise ValueError(
                f"{split_dir} has different classes than {root / splits[0]}: extra {extra[:5]}, missing {missing[:5]}"
            )
    for split in splits:  # the class lists agree; now every class folder must be readable and hold an image
        guarded = _guarded_dirs(root / split)
        for name in classes or []:
            _check_class_folder(split, root / split / name, guarded)
    return classes or []


class RobustImageFolder(ImageFolder):
    """``ImageFolder`` whose unreadable images either raise an error naming the file or are skipped.

    With ``bad_images="skip"`` a failing sample is returned as ``None``; :func:`collate_skipping` drops it and
    counts it, and the LightningModule logs the count.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, bad_images: str = "error"):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        super().__init__(str(root), transform=transform)
        self.bad_images = bad_images

    @staticmethod
    def make_dataset(directory: str | Path, class_to_idx: dict[str, int], extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """``(path, class index)`` of every image, walking each class folder with :func:`walk_class_folder` (torchvision
        follows symbolic links without a loop check: a link to ``..`` multiplied the data set)."""
        valid = is_valid_file or (lambda path: path.lower().endswith(extensions or IMG_EXTENSIONS))
        guarded = _guarded_dirs(Path(directory))
        samples: list[tuple[str, int]] = []
        for name, index in sorted(class_to_idx.items()):
            folder = Path(directory) / name
            samples.extend((path, index) for path in walk_class_folder(folder, guarded, Path(directory).parent)
                           if valid(path))
        return samples

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
            if self.transform is not None:
                sample = self.transform(sample)
        except _IMAGE_ERRORS as err:
            if self.bad_images == "skip":
                return None
            raise RuntimeError(
                f"cannot read image file {path}: {type(err).__name__}: {err}. Fix or remove the file, or set "
                "data.bad_images=skip to skip unreadable files (they are counted in the log as skipped_images)"
            ) from err
        return sample, target


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collates ``(image, target)`` pairs, dropping ``None`` entries; returns ``(images, targets, num_skipped)``."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = default_collate(kept)
    return images, targets, skipped


class ImageFolderDataModule(pl.LightningDataModule):
    """Train/val image folders with timm's training and evaluation transforms.

    In distributed runs Lightning replaces the samplers with ``DistributedSampler`` (``use_distributed_sampler``).

    Args:
        root: dataset root (``<root>/<train_split>/<class>/*`` and ``<root>/<val_split>/<class>/*``).
        img_size: square input side.
        batch_size: per-device training batch size.
        eval_batch_size: per-device evaluation batch size (defaults to ``batch_size``).
        num_workers: data-loader worker processes per device.
        pin_memory: pin host memory (when a GPU is present).
        train_split: training split directory name.
        val_split: validation split directory name.
        train_transform: keyword arguments of ``timm.data.create_transform(is_training=True)`` (``scale``, ``hflip``,
            ``auto_augment``, ``re_prob``, ``interpolation``, ...).
        eval_transform: keyword arguments of ``create_transform(is_training=False)`` (``crop_pct``,
            ``interpolation``, ``crop_mode``).
        mean: normalisation mean.
        std: normalisation std.
        bad_images: ``"error"`` or ``"skip"`` for unreadable files.
        drop_last: drop the last incomplete training batch (needed by batch-mode mixup, which wants an even batch).
        persistent_workers: keep workers alive between epochs.
        aug_repeats: repeated augmentation (timm's ``--aug-repeats``; DeiT used 3): every training image is drawn
            this many times per epoch, each copy on another process
            (:class:`natzoo.datasets.samplers.RepeatAugmentSampler`); 0 turns it off. A run of one process is
            refused (timm's sampler would show each epoch only a fraction of the images).
    """

    def __init__(
        self,
        root: str | Path,
        img_size: int = 224,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        train_split: str = "train",
        val_split: str = "val",
        train_transform: dict | None = None,
        eval_transform: dict | None = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        bad_images: str = "error",
        drop_last: bool = True,
        persistent_workers: bool = True,
        aug_repeats: int = 0,
    ):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and int(eval_batch_size) < 1:
            raise ValueError(f"data.eval_batch_size must be >= 1, got {eval_batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        if isinstance(aug_repeats, bool) or not isinstance(aug_repeats, int) or aug_repeats < 0:
            raise ValueError(f"data.aug_repeats must be an integer >= 0, got {aug_repeats!r}")
        self.aug_repeats = aug_repeats
        self.root = Path(root)
        self.img_size = int(img_size)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.train_split, self.val_split = train_split, val_split
        self.train_transform_args = dict(train_transform or {})
        self.eval_transform_args = dict(eval_transform or {})
        self.mean, self.std = tuple(mean), tuple(std)
        self.bad_images = bad_images
        self.drop_last = bool(drop_last)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        # Datasets with a length: image folders here, the readers' datasets in natzoo.datasets.readers (typed Any:
        # torch's Dataset declares no __len__, and the two kinds share no base class)
        self.train_set: Any = None
        self.val_set: Any = None
        self.classes: list[str] = []
        self._described = False

    def check_layout(self, with_train: bool = True) -> list[str]:
        """Checks the folder layout (no image opened) and records the class names."""
        splits = [self.train_split, self.val_split] if with_train else [self.val_split]
        self.classes = check_image_folder_layout(self.root, splits)
        return self.classes

    @property
    def num_classes(self) -> int:
        """Number of classes (after :meth:`check_layout` or :meth:`setup`)."""
        if not self.classes:
            self.check_layout(with_train=False)
        return len(self.classes)

    def build_transform(self, is_training: bool) -> Callable:
        """timm transform for training or evaluation."""
        args = self.train_transform_args if is_training else self.eval_transform_args
        return create_transform(
            input_size=(3, self.img_size, self.img_size), is_training=is_training, mean=self.mean, std=self.std, **args
        )

    def setup(self, stage: str | None = None) -> None:
        """Scans the image folders (``fit`` needs train and val, ``validate``/``test`` only val)."""
        with_train = stage in (None, "fit")
        self.check_layout(with_train=with_train)
        if with_train and self.train_set is None:
            self.train_set = RobustImageFolder(self.root / self.train_split, self.build_transform(True),
                                               self.bad_images)
        if self.val_set is None:
            self.val_set = RobustImageFolder(self.root / self.val_split, self.build_transform(False), self.bad_images)
        for split, dataset in ((self.train_split, self.train_set), (self.val_split, self.val_set)):
            if dataset is not None and len(dataset) == 0:
                raise ValueError(f"{self.root / split} holds no image files with extensions {IMG_EXTENSIONS}")
        if not self._described:
            self._described = True
            rank_zero_info(self.describe_preprocessing(with_train))

    def describe_preprocessing(self, with_train: bool = True) -> str:
        """One line: input size, normalisation and the training / evaluation transform arguments in use."""
        fmt = ", ".join
        mean, std = fmt(f"{v:.3f}" for v in self.mean), fmt(f"{v:.3f}" for v in self.std)
        parts = [f"Preprocessing: {self.img_size} px, mean ({mean}), std ({std})"]
        if with_train:
            parts.append(f"training {fmt(f'{k}={v}' for k, v in self.train_transform_args.items()) or 'defaults'}")
        parts.append(f"evaluation {fmt(f'{k}={v}' for k, v in self.eval_transform_args.items()) or 'defaults'}")
        return "; ".join(parts)

    def _loader(self, dataset: Any, batch_size: int, train: bool,
                sampler: torch.utils.data.Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),  # no pinned memory without a GPU
            drop_last=train and self.drop_last and len(dataset) >= batch_size,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_skipping,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader (with ``aug_repeats``, timm's repeated-augmentation sampler for this process)."""
        # the dataset is set by setup(), which Lightning calls before any loader
        assert self.train_set is not None, "setup() builds the training set first"
        sampler = None
        if self.aug_repeats:
            from natzoo.datasets.samplers import RepeatAugmentSampler

            trainer = self.trainer
            replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            if replicas == 1:
                from natzoo.datasets.samplers import one_process_aug_repeats

                raise ValueError(one_process_aug_repeats(self.aug_repeats))
            sampler = RepeatAugmentSampler(self.train_set, num_replicas=replicas, rank=rank,
                                           num_repeats=self.aug_repeats)
        return self._loader(self.train_set, self.batch_size, train=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """Validation loader in file order."""
        # the dataset is set by setup(), which Lightning calls before any loader
        return self._loader(self.val_set, self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        """Same as the validation loader."""
        return self.val_dataloader()
