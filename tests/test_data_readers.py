"""data=wds (WebDataset tar shards) and data=hfds (Hugging Face dataset saved on disk) through timm's readers: sample
counts, classes, the folder config's transforms and the bad-image policy, on shards and a dataset generated here."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from natzoo import evaluate, train
from natzoo.classification.task import build_datamodule
from natzoo.testing import compose_config, tiny_overrides

NUM_CLASSES = 3
SIZE = 32


def _image(index: int, label: int) -> Image.Image:
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels[8:24, 8:24, label] = 200  # a bright square in the class's colour channel
    return Image.fromarray(pixels)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shard(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    """A tar shard in the WebDataset layout, written with tarfile alone: <key>.png + <key>.cls per sample."""
    with tarfile.open(path, "w") as tar:
        for key, image, label in samples:
            for name, payload in ((f"{key}.png", image), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _samples(prefix: str, start: int, count: int) -> list[tuple[str, bytes, int]]:
    return [(f"{prefix}{i:04d}", _png(_image(i, i % NUM_CLASSES)), i % NUM_CLASSES) for i in range(start, start + count)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    pytest.importorskip("webdataset")
    root = tmp_path_factory.mktemp("shards")
    _write_shard(root / "train-0000.tar", _samples("tr", 0, 12))
    _write_shard(root / "train-0001.tar", _samples("tr", 12, 12))
    _write_shard(root / "val-0000.tar", _samples("va", 100, 6))
    bad = _samples("bd", 200, 6)
    bad[2] = (bad[2][0], b"not an image at all", bad[2][2])
    _write_shard(root / "bad-0000.tar", bad)
    return root


def _overrides(log_dir: Path, *extra: str) -> list[str]:
    # The tiny model and run of the training tests, without the demo dataset's root and generator settings.
    tiny = [o for o in tiny_overrides("unused", log_dir, epochs=1) if not o.startswith("data.")]
    return tiny + ["data.batch_size=8", "data.eval_batch_size=4", "data.num_workers=0", "data.pin_memory=false",
                   *extra]


def _wds(shards: Path, *extra: str) -> list[str]:
    return ["data=wds", f"data.root={shards}", f"data.num_classes={NUM_CLASSES}", "data.train_split='train-{0000..0001}.tar'",
            "data.val_split=val-0000.tar", "data.train_samples=24", "data.val_samples=6", "data.img_size=32",
            "data.eval_transform.crop_pct=1.0", *extra]


def _datamodule(cfg, stage: str = "fit"):
    dm = build_datamodule(cfg)
    dm.setup(stage)
    return dm


def _read_all(loader) -> tuple[list[torch.Tensor], list[int], int]:
    images, targets, skipped = [], [], 0
    for batch_images, batch_targets, batch_skipped in loader:
        images += list(batch_images)
        targets += batch_targets.tolist()
        skipped += batch_skipped
    return images, targets, skipped


def test_wds_trains_one_epoch_with_counts_classes_and_folder_transforms(shards, tmp_path):
    cfg = compose_config("train", _overrides(tmp_path / "logs", *_wds(shards)), tmp_path / "run")
    result = train(cfg)
    with open(Path(result["output_dir"]) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val/acc1"]) for r in rows if r.get("val/acc1")], "no validation ran"
    assert max(int(r["step"]) for r in rows) + 1 == 24 // 8  # three optimizer steps: the epoch is train_samples long

    # eval.py on the same shards reads every validation sample once and reproduces the validation accuracy.
    res = evaluate(compose_config("eval", [f"ckpt_path={result['best_checkpoint']}", *_wds(shards),
                                           "data.num_workers=0", "+trainer.enable_progress_bar=false"],
                                  tmp_path / "eval"))
    assert res["num_images"] == 6 and res["top1"] == pytest.approx(100 * result["best_score"], abs=1e-4)

    dm = _datamodule(cfg)
    assert dm.check_layout() == ["0", "1", "2"]
    _, train_targets, skipped = _read_all(dm.train_dataloader())
    assert len(train_targets) == 24 and skipped == 0
    assert sorted(train_targets) == sorted(i % NUM_CLASSES for i in range(24))  # each training sample once
    val_images, val_targets, _ = _read_all(dm.val_dataloader())
    assert val_targets == [i % NUM_CLASSES for i in range(100, 106)]  # in shard order

    # The folder config's transforms, built from the same data settings.
    folder = compose_config("train", _overrides(tmp_path / "logs", "data=folder", "data.root=unused", "data.img_size=32",
                                                "data.eval_transform.crop_pct=1.0"))
    folder_dm = build_datamodule(folder)
    assert repr(dm.build_transform(True)) == repr(folder_dm.build_transform(True))
    evaluation = folder_dm.build_transform(False)
    for index, image in zip(range(100, 106), val_images):
        torch.testing.assert_close(image, evaluation(_image(index, index % NUM_CLASSES)), rtol=0, atol=0)


def test_wds_bad_images_skip_counts_and_error_names_the_sample(shards, tmp_path):
    skip = compose_config("train", _overrides(tmp_path / "logs", *_wds(shards, "data.val_split=bad-0000.tar",
                                                                       "data.bad_images=skip")))
    _, targets, skipped = _read_all(_datamodule(skip, "validate").val_dataloader())
    assert skipped == 1 and targets == [i % NUM_CLASSES for i in (200, 201, 203, 204, 205)]

    error = compose_config("train", _overrides(tmp_path / "logs", *_wds(shards, "data.val_split=bad-0000.tar")))
    with pytest.raises(RuntimeError, match=r"'bd0202' of shard .*bad-0000\.tar.*data\.bad_images=skip"):
        _read_all(_datamodule(error, "validate").val_dataloader())


def test_wds_trains_with_a_skipped_sample_and_logs_it(shards, tmp_path):
    cfg = compose_config("train", _overrides(tmp_path / "logs", *_wds(shards, "data.val_split=bad-0000.tar",
                                                                      "data.bad_images=skip")), tmp_path / "run")
    result = train(cfg)
    with open(Path(result["output_dir"]) / "metrics.csv") as f:
        logged = [float(r["val/skipped_images"]) for r in csv.DictReader(f) if r.get("val/skipped_images")]
    assert logged and logged[-1] >= 1


@pytest.mark.parametrize("override, message", [
    ("data.num_classes=null", "data.num_classes is not set"),
    ("data.train_samples=null", "data.train_samples is not set"),
    ("data.train_split='train-{0000..0002}.tar'", "shard file"),
    ("data.val_split=val", "not a shard pattern"),
    ("data.num_classes=0", "data.num_classes=0"),
    ("data.shuffle_buffer=-5", "data.shuffle_buffer=-5"),
])
def test_wds_config_errors_before_training(shards, tmp_path, override, message):
    cfg = compose_config("train", _overrides(tmp_path / "logs", *_wds(shards, override)), tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory) -> Path:
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf") / "saved"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "green",
                                                                                                  "blue"])})

    def split(start: int, count: int, bad: int | None = None) -> datasets.Dataset:
        images = [{"bytes": b"garbage" if i == bad else _png(_image(i, i % NUM_CLASSES)), "path": None}
                  for i in range(start, start + count)]
        return datasets.Dataset.from_dict({"image": images, "label": [i % NUM_CLASSES for i in range(start,
                                                                                                     start + count)]},
                                          features=features)

    datasets.DatasetDict(train=split(0, 24), validation=split(100, 6), test=split(200, 6, bad=202)).save_to_disk(
        str(root))
    return root


def _hfds(root: Path, cache: Path, *extra: str) -> list[str]:
    return ["data=hfds", f"data.root={root}", f"data.cache_dir={cache}", "data.img_size=32",
            "data.eval_transform.crop_pct=1.0", *extra]


def test_hfds_trains_one_epoch_with_counts_classes_and_folder_transforms(hf_dataset, tmp_path):
    cfg = compose_config("train", _overrides(tmp_path / "logs", *_hfds(hf_dataset, tmp_path / "cache")),
                         tmp_path / "run")
    result = train(cfg)
    with open(Path(result["output_dir"]) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val/acc1"]) for r in rows if r.get("val/acc1")], "no validation ran"
    assert max(int(r["step"]) for r in rows) + 1 == 24 // 8

    dm = _datamodule(cfg)
    assert dm.classes == ["red", "green", "blue"]
    assert len(dm.train_set) == 24 and len(dm.val_set) == 6
    val_images, val_targets, _ = _read_all(dm.val_dataloader())
    assert val_targets == [i % NUM_CLASSES for i in range(100, 106)]
    folder = compose_config("train", _overrides(tmp_path / "logs", "data=folder", "data.root=unused", "data.img_size=32",
                                                "data.eval_transform.crop_pct=1.0"))
    folder_dm = build_datamodule(folder)
    assert repr(dm.build_transform(True)) == repr(folder_dm.build_transform(True))
    evaluation = folder_dm.build_transform(False)
    for index, image in zip(range(100, 106), val_images):
        torch.testing.assert_close(image, evaluation(_image(index, index % NUM_CLASSES)), rtol=0, atol=0)


def test_hfds_bad_images_skip_counts_and_error_names_the_row(hf_dataset, tmp_path):
    extra = ("data.val_split=test",)
    skip = compose_config("train", _overrides(tmp_path / "logs", *_hfds(hf_dataset, tmp_path / "cache", *extra,
                                                                        "data.bad_images=skip")))
    _, targets, skipped = _read_all(_datamodule(skip, "validate").val_dataloader())
    assert skipped == 1 and targets == [i % NUM_CLASSES for i in (200, 201, 203, 204, 205)]

    error = compose_config("train", _overrides(tmp_path / "logs", *_hfds(hf_dataset, tmp_path / "cache", *extra)))
    with pytest.raises(RuntimeError, match=r"row 2 of split 'test'.*data\.bad_images=skip"):
        _read_all(_datamodule(error, "validate").val_dataloader())


def test_hfds_missing_split_is_a_clear_error(hf_dataset, tmp_path):
    cfg = compose_config("train", _overrides(tmp_path / "logs", *_hfds(hf_dataset, tmp_path / "cache",
                                                                       "data.val_split=nope")), tmp_path / "run")
    with pytest.raises(ValueError, match="nope"):
        train(cfg)


@pytest.mark.parametrize("module, target", [("webdataset", "WdsDataModule"), ("datasets", "HfdsDataModule")])
def test_readers_need_their_package(tmp_path, monkeypatch, module, target):
    import sys

    from natzoo.datasets.readers import check_reader_source

    monkeypatch.setitem(sys.modules, module, None)  # an import of it now fails as if it were not installed
    with pytest.raises(ImportError, match=rf"needs the '{module}' package: pip install 'natzoo\[data\]'"):
        check_reader_source({"_target_": f"natzoo.datasets.readers.{target}", "root": str(tmp_path)}, "fit")


def test_wds_shard_order_follows_the_epoch(shards, tmp_path):
    # A one-sample shuffle buffer leaves the shard order visible: the first sample is the first one of a shard.
    cfg = compose_config("train", _overrides(tmp_path / "logs", *_wds(shards, "data.shuffle_buffer=1")))
    dm = _datamodule(cfg)
    firsts = {_png(_image(0, 0)): "train-0000", _png(_image(12, 0)): "train-0001"}
    loader = dm.train_dataloader()

    def first_shard(epoch: int) -> str:
        loader.epoch_source = lambda: epoch
        iter(loader)  # what the trainer does at the start of an epoch: the loader hands the epoch to the reader
        return firsts[_png(next(iter(dm.train_set.reader))[0])]

    orders = [first_shard(epoch) for epoch in range(8)]
    assert set(orders) == {"train-0000", "train-0001"}  # reshuffled between epochs
    assert [first_shard(epoch) for epoch in range(8)] == orders  # and the same again for the same epoch (resume)
