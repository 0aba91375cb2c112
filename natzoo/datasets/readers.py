"""Classification data beyond image folders, through timm's dataset readers: WebDataset tar shards (``data=wds``,
timm's ``ReaderWds``) and Hugging Face datasets saved on disk (``data=hfds``, timm's ``ReaderHfds``).

Both data modules keep the image-folder module's timm transforms, preprocessing line and ``bad_images`` policy:
with ``error`` an undecodable image raises an error naming the shard and key (WebDataset) or the split and row
(Hugging Face); with ``skip`` it becomes a ``None`` sample that the collate function drops and counts.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from natzoo.datasets.folder import BAD_IMAGE_POLICIES, ImageFolderDataModule, collate_skipping

__all__ = ["READER_DATAMODULES", "HfdsDataModule", "WdsDataModule", "check_reader_source"]

log = logging.getLogger(__name__)

_WDS_TARGET = "natzoo.datasets.readers.WdsDataModule"
_HFDS_TARGET = "natzoo.datasets.readers.HfdsDataModule"
READER_DATAMODULES = (_WDS_TARGET, _HFDS_TARGET)

# What PIL and the label parsing raise on a bad sample (UnidentifiedImageError and truncated files are OSErrors).
_BAD_SAMPLE_ERRORS = (OSError, ValueError, SyntaxError)


def _require(module: str, data: str) -> None:
    try:
        __import__(module)
    except ImportError as err:
        raise ImportError(f"data={data} needs the {module!r} package: pip install 'natzoo[data]' (or pip install "
                          f"{module})") from err


def _shard_files(root: Path, split: str) -> list[str]:
    """Shard paths of a split given as a brace pattern (``train-{0000..0003}.tar``), a glob, or a file name."""
    from webdataset.shardlists import expand_urls

    pattern = split.split("|")[0]
    names = [name for part in expand_urls(pattern) for name in (glob.glob(str(root / part)) or [str(root / part)])]
    return sorted(set(names))


def check_reader_source(data: dict[str, Any], stage: str) -> None:
    """Cheap checks of a ``data=wds`` / ``data=hfds`` config before anything is built (no image is read).

    Args:
        data: the plain data config.
        stage: ``"fit"`` (train and validation splits) or ``"eval"`` (validation split only).

    Raises:
        ImportError: the reader's package is not installed.
        ValueError: the root, a shard, a sample count or the class count is missing.
    """
    target = data.get("_target_")
    root = data.get("root")
    if root in (None, "", "???"):
        what = "shards" if target == _WDS_TARGET else "dataset"
        raise ValueError(f"data.root is not set: pass data.root=/path/to/{what}")
    if not Path(root).is_dir():
        raise ValueError(f"data.root={str(root)!r} does not exist or is not a directory")
    if target == _HFDS_TARGET:
        _require("datasets", "hfds")
        _check_saved_dataset(Path(root), data, stage)
        return
    _require("webdataset", "wds")
    has_info = any((Path(root) / name).is_file() for name in ("_info.json", "info.json"))
    splits = ("train", "val") if stage == "fit" else ("val",)
    for which in splits:
        split = str(data.get(f"{which}_split"))
        if "tar" in split or ".." in split:
            missing = [f for f in _shard_files(Path(root), split) if not Path(f).is_file()]
            if missing:
                raise ValueError(f"data.{which}_split={split!r}: shard file(s) not found under {root}: {missing[:5]}")
        elif not has_info:
            raise ValueError(f"data.{which}_split={split!r} is not a shard pattern (e.g. '{which}-{{0000..0003}}.tar')"
                             f" and {root} has no _info.json naming splits")
        if not data.get(f"{which}_samples") and "|" not in split and not has_info:
            raise ValueError(f"data.{which}_samples is not set and {root} has no _info.json: WebDataset shards carry "
                             f"no sample count, so set data.{which}_samples=<number of samples in the split>")
    if not data.get("num_classes"):
        raise ValueError("data.num_classes is not set: WebDataset .cls labels carry no class list, so set "
                         "data.num_classes=<number of classes>")


def _check_saved_dataset(root: Path, data: dict[str, Any], stage: str) -> None:
    """``root`` is a folder written by ``save_to_disk`` and, for a ``DatasetDict``, holds the configured splits."""
    listing = root / "dataset_dict.json"
    if not listing.is_file():
        if (root / "state.json").is_file():
            return  # one saved Dataset: timm's reader takes it as the only split
        raise ValueError(f"data.root={str(root)!r} is not a Hugging Face dataset saved with save_to_disk (it has "
                         "neither dataset_dict.json nor state.json); data=hfds reads such folders, data=folder reads "
                         "image folders")
    try:
        splits = json.loads(listing.read_text()).get("splits")
    except (OSError, ValueError, AttributeError):
        return  # unreadable: timm's reader reports it
    if not isinstance(splits, list):
        return
    for which in ("train", "val") if stage == "fit" else ("val",):
        split = data.get(f"{which}_split")
        if split is not None and str(split) not in splits:
            raise ValueError(f"data.{which}_split={str(split)!r} is not a split of the dataset in "
                             f"data.root={str(root)!r} (its splits: {splits})")


class _SkipCountingIterable(IterableDataset):
    """timm's ``IterableImageDataset`` iteration over a reader that yields ``(None, None)`` for a skipped sample;
    that sample becomes ``None``, which :func:`collate_skipping` drops and counts. A label outside
    ``[0, num_classes)`` is an error naming the shards and ``data.num_classes``."""

    def __init__(self, reader: Any, transform: Callable, num_classes: int | None = None, where: str = ""):
        self.reader = reader
        self.transform = transform
        self.num_classes, self.where = num_classes, where

    def __iter__(self) -> Iterator[Any]:
        for image, target in self.reader:
            if image is None:
                yield None
                continue
            if self.num_classes and isinstance(target, int) and not 0 <= target < self.num_classes:
                raise RuntimeError(f"a sample of {self.where} has label {target}, outside 0..{self.num_classes - 1} "
                                   f"(data.num_classes={self.num_classes}): set data.num_classes to the shards' "
                                   "class count, or fix the sample's .cls file")
            yield self.transform(image), target

    def __len__(self) -> int:
        return len(self.reader)

    def set_epoch(self, epoch: int) -> None:
        """Epoch number for the reader's deterministic shard shuffle."""
        self.reader.set_epoch(epoch)


def _reraise(exn: Exception) -> bool:
    raise exn


def _warn_and_continue(exn: Exception) -> bool:
    log.warning("skipped unreadable WebDataset data: %r", exn)
    return True


def _decode_with_policy(sample: dict, bad_images: str, **decode_args: Any) -> dict | None:
    """timm's WebDataset sample decoding; an undecodable image or label is reported with its shard and key."""
    from timm.data.readers.reader_wds import WdsTargetKeyError, _decode

    if not decode_args.get("target_key") and not decode_args.get("alt_label") and "cls" not in sample:
        files = sorted(k for k in sample if not k.startswith("__"))
        raise RuntimeError(
            f"sample {sample.get('__key__')!r} of shard {sample.get('__url__')} has no .cls label file (it holds "
            f"{files}): WebDataset classification shards need <key>.cls with the class index beside each image")
    try:
        return _decode(sample, **decode_args)
    except WdsTargetKeyError:
        raise
    except _BAD_SAMPLE_ERRORS as err:
        if bad_images == "skip":
            return {"jpg": None, "target": None, "json": None}
        raise RuntimeError(
            f"cannot read sample {sample.get('__key__')!r} of shard {sample.get('__url__')}: {type(err).__name__}: "
            f"{err}. Fix or remove the sample, or set data.bad_images=skip to skip unreadable samples (they are "
            "counted in the log as skipped_images)") from err


def _policy_reader_wds(bad_images: str, **kwargs: Any) -> Any:
    """timm's ``ReaderWds`` with the decoding stage of its pipeline applying ``bad_images``."""
    # webdataset's own modules: its package re-exports them by star imports, which static checkers do not follow
    from webdataset import filters
    from webdataset.pipeline import DataPipeline
    from webdataset.shardlists import SimpleShardList
    from webdataset.tariterators import tarfile_to_samples
    from timm.data.readers.reader_wds import ReaderWds, detshuffle2

    class PolicyReaderWds(ReaderWds):
        def _lazy_init(self) -> None:
            super()._lazy_init()  # worker and rank bookkeeping; the pipeline is rebuilt below with the policy
            shards = [os.path.join(self.root, f) for f in self.split_info.filenames]
            tar_handler = _reraise if bad_images == "error" else _warn_and_continue
            stages: list[Any] = [SimpleShardList(shards)]
            if self.is_training:
                stages.append(detshuffle2(self.shard_shuffle_size, seed=self.common_seed, epoch=self.epoch_count))
            stages += [self._split_by_node_and_worker, tarfile_to_samples(handler=tar_handler)]
            if self.is_training:
                import random

                stages.append(filters.shuffle(bufsize=self.sample_shuffle_size, initial=self.sample_initial_size,
                                          rng=random.Random(self.worker_seed)))
            decode = partial(_decode_with_policy, bad_images=bad_images, image_key=self.input_key,
                             image_mode=self.input_img_mode, target_key=self.target_key,
                             alt_label=self.split_info.alt_label)
            stages += [filters.map(decode, handler=_reraise), filters.rename(image=self.input_key, target="target")]
            # timm's ReaderWds declares `ds = None` until its lazy init builds the pipeline
            self.ds = DataPipeline(*stages)  # type: ignore[assignment]

    return PolicyReaderWds(**kwargs)


class _EpochLoader(DataLoader):
    """DataLoader that hands the trainer's epoch to an iterable dataset before each pass (Lightning sets the epoch
    of samplers only), so the shard shuffle differs between epochs and repeats on resume."""

    epoch_source: Callable[[], int] | None = None

    def __iter__(self) -> Any:
        if self.epoch_source is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch_source())
        return super().__iter__()


class WdsDataModule(ImageFolderDataModule):
    """WebDataset tar shards (``<key>.jpg|png|webp`` + ``<key>.cls``) read by timm's ``ReaderWds``.

    An epoch has a fixed number of samples (``train_samples``, or timm's ``_info.json``), split across processes and
    loader workers by shard: use at least as many shards as processes x workers. Shards are shuffled per epoch
    (seeded by the epoch), samples in a buffer of ``shuffle_buffer``. Validation reads the shards in order.

    Args:
        root: folder holding the shards.
        train_split: training shards, a brace pattern relative to ``root`` (``train-{0000..0003}.tar``) or a split
            name of ``_info.json``.
        val_split: validation shards, as ``train_split``.
        num_classes: number of classes (``.cls`` holds integer labels ``0..num_classes-1``).
        train_samples: samples per training epoch (None: from ``_info.json``).
        val_samples: validation samples (None: from ``_info.json``).
        shuffle_buffer: training sample-shuffle buffer (None: timm's default).
        seed: seed of the shard shuffle, the same on every process.
        **kwargs: the arguments of :class:`~natzoo.datasets.folder.ImageFolderDataModule`.
    """

    def __init__(self, root: str | Path, train_split: str = "train", val_split: str = "val",
                 num_classes: int | None = None, train_samples: int | None = None, val_samples: int | None = None,
                 shuffle_buffer: int | None = None, seed: int = 42, **kwargs: Any):
        if kwargs.get("aug_repeats"):
            raise ValueError("data.aug_repeats is not supported with data=wds (shards are streamed, not sampled)")
        super().__init__(root, train_split=train_split, val_split=val_split, **kwargs)
        self.num_classes_given = num_classes
        self.train_samples, self.val_samples = train_samples, val_samples
        self.shuffle_buffer, self.seed = shuffle_buffer, int(seed)

    def check_layout(self, with_train: bool = True) -> list[str]:
        """Checks shards, counts and the class count (no image read); the classes are named ``0..n-1``."""
        check_reader_source({"_target_": _WDS_TARGET, "root": str(self.root), "train_split": self.train_split,
                             "val_split": self.val_split, "train_samples": self.train_samples,
                             "val_samples": self.val_samples, "num_classes": self.num_classes_given},
                            "fit" if with_train else "eval")
        self.classes = [str(i) for i in range(int(self.num_classes_given or 0))]
        return self.classes

    def _dataset(self, train: bool) -> _SkipCountingIterable:
        reader = _policy_reader_wds(
            self.bad_images, root=str(self.root), split=self.train_split if train else self.val_split,
            is_training=train, num_samples=self.train_samples if train else self.val_samples,
            batch_size=self.batch_size if train else self.eval_batch_size, seed=self.seed,
            sample_shuffle_size=self.shuffle_buffer, sample_initial_size=self.shuffle_buffer)
        split = self.train_split if train else self.val_split
        dataset = _SkipCountingIterable(reader, self.build_transform(train), self.num_classes_given,
                                        f"data.{'train' if train else 'val'}_split={split!r} under {self.root}")
        reader.set_loader_cfg(num_workers=self.num_workers)  # the sample count per worker needs the worker count
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Builds timm's readers (the distributed rank is read here, after the process group exists)."""
        with_train = stage in (None, "fit")
        self.check_layout(with_train=with_train)
        if with_train and self.train_set is None:
            self.train_set = self._dataset(train=True)
        if self.val_set is None:
            self.val_set = self._dataset(train=False)
        if not self._described:
            self._described = True
            rank_zero_info(self.describe_preprocessing(with_train))

    def _loader(self, dataset: Any, batch_size: int, train: bool,
                sampler: torch.utils.data.Sampler | None = None) -> DataLoader:
        loader = _EpochLoader(
            dataset, batch_size=batch_size, num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(), drop_last=train and self.drop_last,
            persistent_workers=self.persistent_workers, collate_fn=collate_skipping)
        trainer = self.trainer
        if train and trainer is not None:
            loader.epoch_source = lambda: trainer.current_epoch
        return loader


class _PolicyMapDataset(Dataset):
    """Rows of timm's ``ReaderHfds`` decoded and transformed under the ``bad_images`` policy; ``remap[t]`` is the
    class index (in the data module's class order) of the split's stored label ``t`` (None: the same)."""

    def __init__(self, reader: Any, transform: Callable, bad_images: str, split: str, root: str | Path | None = None,
                 remap: list[int] | None = None):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        self.reader, self.transform, self.bad_images, self.split = reader, transform, bad_images, split
        self.root, self.remap = root, remap

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> Any:
        try:
            file, target = self.reader[index]
            with file:
                image = Image.open(file).convert("RGB")  # converting decodes, so a corrupt image fails here
            image = self.transform(image)
        except _BAD_SAMPLE_ERRORS as err:
            if self.bad_images == "skip":
                return None
            raise RuntimeError(
                f"cannot read the image of row {index} of split {self.split!r} of data.root={str(self.root)!r}: "
                f"{type(err).__name__}: {err}. Fix or remove the row, or set data.bad_images=skip to skip unreadable "
                "images (they are counted in the log as skipped_images)") from err
        if self.remap is not None and isinstance(target, int) and 0 <= target < len(self.remap):
            target = self.remap[target]
        return image, target


class HfdsDataModule(ImageFolderDataModule):
    """A Hugging Face dataset saved on disk (``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``) read by timm's
    ``ReaderHfds``; class names come from the label column's ``ClassLabel`` feature.

    Args:
        root: the saved dataset's folder.
        train_split: training split name.
        val_split: validation split name.
        image_key: image column.
        label_key: label column.
        num_classes: number of classes when the label column is a plain integer (no ``ClassLabel``).
        cache_dir: where ``datasets`` keeps its prepared copy (None: its default cache).
        **kwargs: the arguments of :class:`~natzoo.datasets.folder.ImageFolderDataModule`.
    """

    def __init__(self, root: str | Path, train_split: str = "train", val_split: str = "validation",
                 image_key: str = "image", label_key: str = "label", num_classes: int | None = None,
                 cache_dir: str | None = None, **kwargs: Any):
        super().__init__(root, train_split=train_split, val_split=val_split, **kwargs)
        self.image_key, self.label_key = image_key, label_key
        self.num_classes_given, self.cache_dir = num_classes, cache_dir
        self._readers: dict[str, Any] = {}

    def _reader(self, split: str) -> Any:
        if split not in self._readers:
            from timm.data.readers import create_reader

            try:
                self._readers[split] = create_reader(f"hfds/{self.root.resolve()}", root=self.cache_dir, split=split,
                                                     input_key=self.image_key, target_key=self.label_key)
            except (ValueError, KeyError) as err:
                raise ValueError(f"data.root={str(self.root)!r}: cannot read split {split!r} with columns "
                                 f"{self.image_key!r}/{self.label_key!r}: {err}") from err
        return self._readers[split]

    def split_class_names(self, split: str) -> list[str] | None:
        """The names of ``split``'s own ``ClassLabel`` as saved (``<root>/<split>/dataset_info.json``), or None
        when the folder does not record them per split (a single saved ``Dataset``, a plain integer column).

        timm's reader (through ``datasets.load_dataset``) gives every split the first split's label names, while the
        stored integers of each split index its own list, so the two can disagree.
        """
        info = self.root / split / "dataset_info.json"
        try:
            feature = json.loads(info.read_text()).get("features", {}).get(self.label_key)
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel":
            return None
        names = feature.get("names")
        return [str(n) for n in names] if isinstance(names, list) else None

    def _remap(self, split: str) -> list[int] | None:
        """Stored label of ``split`` -> index in :attr:`classes`, when its own ``ClassLabel`` lists them in another
        order (None: the same order)."""
        own = self.split_class_names(split)
        if own is None or own == self.classes:
            return None
        return [self.classes.index(name) for name in own]

    def check_layout(self, with_train: bool = True) -> list[str]:
        """Opens the splits (no image decoded) and returns the class names: the training split's own ``ClassLabel``
        order (also when evaluating, so that a checkpoint sees the classes in the order it was trained on).

        Raises:
            ValueError: the splits' ``ClassLabel`` features list different classes (naming the split and the
                classes that differ), or the label column is a plain integer and ``num_classes`` is not set.
        """
        check_reader_source({"_target_": _HFDS_TARGET, "root": str(self.root), "train_split": self.train_split,
                             "val_split": self.val_split}, "fit" if with_train else "eval")
        splits = [self.train_split, self.val_split] if with_train else [self.val_split]
        reader_names = [sorted(self._reader(s).class_to_idx, key=self._reader(s).class_to_idx.get) for s in splits]
        own = {s: self.split_class_names(s) for s in dict.fromkeys([self.train_split, *splits])}
        names: list[list[str]] = [own[s] or reader_names[i] for i, s in enumerate(splits)]
        reference: list[str] = own[self.train_split] or names[0]
        for split, listed in zip(splits, names):
            if sorted(listed) != sorted(reference):
                extra, lacking = sorted(set(listed) - set(reference)), sorted(set(reference) - set(listed))
                raise ValueError(
                    f"data.root={str(self.root)!r}: split {split!r} lists other classes than split "
                    f"{self.train_split!r} (only in {split!r}: {extra[:5]}; missing from it: {lacking[:5]}): a "
                    "model trained on one cannot be scored on the other")
        if reference:
            self.classes = list(reference)
        elif self.num_classes_given:
            self.classes = [str(i) for i in range(int(self.num_classes_given))]
        else:
            raise ValueError(f"data.root={str(self.root)!r}: column {self.label_key!r} is not a ClassLabel, so set "
                             "data.num_classes=<number of classes>")
        return self.classes

    def setup(self, stage: str | None = None) -> None:
        """Opens the splits with timm's reader."""
        with_train = stage in (None, "fit")
        self.check_layout(with_train=with_train)
        if with_train and self.train_set is None:
            self.train_set = _PolicyMapDataset(self._reader(self.train_split), self.build_transform(True),
                                               self.bad_images, self.train_split, self.root,
                                               self._remap(self.train_split))
        if self.val_set is None:
            remap = self._remap(self.val_split)
            if remap is not None:
                rank_zero_info(f"data.root={str(self.root)!r}: split {self.val_split!r} lists its classes in another "
                               f"order than {self.train_split!r}; its labels are mapped by class name")
            self.val_set = _PolicyMapDataset(self._reader(self.val_split), self.build_transform(False),
                                             self.bad_images, self.val_split, self.root, remap)
        for split, dataset in ((self.train_split, self.train_set), (self.val_split, self.val_set)):
            if dataset is not None and len(dataset) == 0:
                raise ValueError(f"split {split!r} of {self.root} is empty")
        if not self._described:
            self._described = True
            rank_zero_info(self.describe_preprocessing(with_train))
