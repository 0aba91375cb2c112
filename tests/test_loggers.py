"""The `logger` config group: CSV (always), TensorBoard and Weights & Biases (offline here), each receiving the same
metrics as metrics.csv; a missing package is named before training."""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path

import pytest
from helpers import one_thread  # noqa: F401

from natzoo import train
from natzoo.datasets import ensure_demo_dataset
from natzoo.testing import compose_config, tiny_overrides


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "demo"
    return ensure_demo_dataset(root, train_per_class=8, val_per_class=4, img_size=32, seed=0)


def _run(demo_root: Path, tmp_path: Path, logger: str) -> tuple[Path, list[float]]:
    overrides = [o for o in tiny_overrides(demo_root, tmp_path / "logs", epochs=2) if not o.startswith("logger=")]
    result = train(compose_config("train", overrides + [f"logger={logger}", "+logger.csv.flush_logs_every_n_steps=1"]
                                  + (["logger.wandb.offline=true"] if logger == "wandb" else []), tmp_path / "run"))
    out = Path(result["output_dir"])
    with open(out / "metrics.csv") as f:
        val = [float(r["val/acc1"]) for r in csv.DictReader(f) if r.get("val/acc1")]
    assert len(val) == 2
    return out, val


@pytest.mark.slow
def test_tensorboard_logger_records_the_csv_metrics(demo_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, val = _run(demo_root, tmp_path, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("val/acc1")] == pytest.approx(val)


@pytest.mark.slow
def test_wandb_logger_offline_writes_the_run_locally(demo_root, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))  # W&B's own settings and cache stay in the test
    out, val = _run(demo_root, tmp_path, "wandb")
    wandb.finish()  # what the end of the process does for train.py
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # The run's record file (protobuf): a history or summary item is its key, then field 16 (value_json) with its
    # length byte. Each epoch's value appears in the history and again in the summary updates. W&B's writer process
    # may still be appending after finish() returns: read until the file stops growing.
    expected = list(dict.fromkeys(val))
    logged: list[float] = []
    for _ in range(60):
        data = runs[0].read_bytes()
        found = re.finditer(rb"val/acc1\x82\x01(.)", data, re.DOTALL)
        logged = list(dict.fromkeys(float(data[m.end():m.end() + m.group(1)[0]]) for m in found))
        if len(logged) >= len(expected):
            break
        time.sleep(1)
    assert logged == pytest.approx(expected)


@pytest.mark.parametrize("logger,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_logger_package_stops_the_run_before_its_directory_is_claimed(logger, package, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("tensorboard", "tensorboardX", "wandb")
                        else real(name, *a))
    run_dir = tmp_path / "run"
    cfg = compose_config("train", [f"logger={logger}"], run_dir)
    with pytest.raises(ValueError, match=f"logger.{logger} needs the {package} package: pip install {package}"):
        train(cfg)
    assert not run_dir.exists()  # nothing written: the check runs with the config checks


def test_the_default_logger_needs_no_optional_package(tmp_path):
    cfg = compose_config("train", [], tmp_path)
    assert [spec["_target_"] for spec in cfg.logger.values()] == ["natzoo.run.loggers.RunCSVLogger"]
