"""The console and the run's logs: one line per epoch (console and train.log) and summary.csv, the progress bar only
where it belongs, every message once, a confirmation line per training feature, and `model.pretrained=true`."""

from __future__ import annotations

import csv
import io
import logging
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from helpers import one_thread  # noqa: F401
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, TQDMProgressBar

from natzoo import (
    models,  # noqa: F401  (registers the NAT families with timm)
    train,
)
from natzoo.datasets import ensure_demo_dataset
from natzoo.run.callbacks import progress_bar
from natzoo.run.console import configure_console
from natzoo.run.tasks import get_task
from natzoo.run.training import build_callbacks, build_trainer
from natzoo.testing import compose_config, tiny_overrides

TINY = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "kernel_size": 3}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "demo"
    return ensure_demo_dataset(root, train_per_class=8, val_per_class=4, img_size=32, seed=0)


def _messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# --- one line per epoch, summary.csv, and no warning about the logging interval --------------------------------------

def test_one_line_per_epoch_and_summary_csv_agree_with_metrics_csv(demo_root, tmp_path, caplog, recwarn):
    overrides = tiny_overrides(demo_root, tmp_path / "logs", epochs=2) + ["+logger.csv.flush_logs_every_n_steps=1"]
    with caplog.at_level(logging.INFO, logger="natzoo"):
        result = train(compose_config("train", overrides, tmp_path / "run"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    out = Path(result["output_dir"])
    logged: dict[int, dict[str, str]] = {}  # Lightning's CSV logger, merged per epoch: the reference
    with open(out / "metrics.csv") as f:
        for r in csv.DictReader(f):
            logged.setdefault(int(r["epoch"]), {}).update({k: v for k, v in r.items() if v})
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row, ref, line in zip(rows, [logged[0], logged[1]], lines):
        assert float(row["val/acc1"]) == pytest.approx(float(ref["val/acc1"]))
        assert float(row["train/loss"]) == pytest.approx(float(ref["train/loss_epoch"]))
        assert f"val/acc1 {100 * float(ref['val/acc1']):.2f}%" in line and ", lr " in line and line.endswith(" s")
        assert float(row["lr"]) > 0 and float(row["epoch_seconds"]) > 0
    # 8 batches per epoch, fewer than log_every_n_steps=10: Lightning's advice does not apply (epoch metrics exist)
    assert not [w for w in recwarn if "smaller than the logging interval" in str(w.message)]


# --- the progress bar -----------------------------------------------------------------------------------------------

def test_progress_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a file: no bar
    assert progress_bar() is None
    assert isinstance(progress_bar(enabled=True), TQDMProgressBar)
    terminal = io.StringIO()
    terminal.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stdout", terminal)
    assert isinstance(progress_bar(), TQDMProgressBar) and progress_bar(enabled=False) is None
    with pytest.raises(ValueError, match="callbacks.progress_bar.enabled must be true, false or auto"):
        progress_bar(enabled="yes")


@pytest.mark.parametrize("override", ["callbacks.progress_bar=null", "+trainer.enable_progress_bar=false"])
def test_progress_bar_switches_really_remove_the_bar(tmp_path, override):
    cfg = compose_config("train", ["callbacks.progress_bar.enabled=true", override], tmp_path)
    callbacks = build_callbacks(cfg, get_task("classification"))
    trainer = build_trainer(cfg, callbacks, False)
    assert not [cb for cb in trainer.callbacks if isinstance(cb, ProgressBar)]  # Lightning added none of its own


def test_one_model_summary_and_no_message_about_it(tmp_path, caplog, monkeypatch):
    cfg = compose_config("train", [], tmp_path)
    callbacks = build_callbacks(cfg, get_task("classification"))
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)  # as under Hydra (configure_console)
    with caplog.at_level(logging.INFO):
        trainer = build_trainer(cfg, callbacks, False)
    assert len([cb for cb in trainer.callbacks if isinstance(cb, ModelSummary)]) == 1
    assert not _messages(caplog, "already configured with model summary")


# --- every message once ---------------------------------------------------------------------------------------------

def test_head_swap_is_said_once(tmp_path, caplog):
    from natzoo.models import load_weights

    torch.save(timm.create_model("nat_mini", num_classes=8, **TINY).state_dict(), tmp_path / "eight.pth")
    model = timm.create_model("nat_mini", num_classes=5, **TINY)
    with caplog.at_level(logging.INFO, logger="natzoo"):
        load_weights(model, tmp_path / "eight.pth", head="auto")
    said = [r for r in caplog.records if "eight.pth" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "re-initialised" in said[0].getMessage() and "8 classes" in said[0].getMessage()


@pytest.mark.parametrize("rank_zero", [True, False])
def test_optimizer_line_only_on_rank_zero(rank_zero, caplog):
    from natzoo.optim import configure_optimizers

    trainer = SimpleNamespace(estimated_stepping_batches=8, num_training_batches=4, max_epochs=2,
                              accumulate_grad_batches=1, world_size=2, is_global_zero=rank_zero,
                              datamodule=SimpleNamespace(batch_size=8))
    optim = compose_config("train", []).optim
    sched = compose_config("train", []).sched
    from natzoo.rules import plain

    with caplog.at_level(logging.INFO, logger="natzoo"):
        configure_optimizers(SimpleNamespace(trainer=trainer), torch.nn.Linear(2, 2), plain(optim), plain(sched))
    assert len(_messages(caplog, "optimizer ")) == (1 if rank_zero else 0)


def test_iterable_dataset_length_warning_is_not_shown():
    from lightning.pytorch.utilities.data import has_len_all_ranks

    class Sized(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(4))

        def __len__(self) -> int:
            return 4

    loader = torch.utils.data.DataLoader(Sized(), batch_size=2)
    strategy = SimpleNamespace(reduce=lambda tensor, reduce_op: tensor, root_device=torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configure_console()
        assert has_len_all_ranks(loader, strategy)  # type: ignore[arg-type]
    assert not [w for w in caught if "IterableDataset" in str(w.message)]


# --- confirmation lines and model.pretrained ------------------------------------------------------------------------

def _module(demo_root: Path, tmp_path: Path, *extra: str, caplog=None):
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs") + list(extra), tmp_path / "run")
    task = get_task("classification")
    task.validate_config(cfg, "fit", None)
    datamodule = task.build_datamodule(cfg, None)
    return cfg, task.build_module(cfg, datamodule)


def test_each_training_feature_switched_on_is_confirmed_once(demo_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="natzoo"):
        # repeated augmentation spreads an image's copies over processes: refused on one, so two CPU processes here
        _module(demo_root, tmp_path, "optim.layer_decay=0.7", "loss.name=bce", "data.aug_repeats=2",
                "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "ema.enabled=true",
                "data.mixup.mixup_alpha=0.8")
    for text in ("layer-wise lr decay 0.7", "loss: binary cross-entropy", "repeated augmentation: each training "
                 "image 2 times", "EMA of the weights: decay", "mixup/cutmix: mixup_alpha 0.8"):
        assert len(_messages(caplog, text)) == 1, text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="natzoo"):
        _module(demo_root, tmp_path)
    assert not _messages(caplog, "layer-wise") and not _messages(caplog, "EMA of") and not _messages(caplog, "loss:")


def test_model_pretrained_fine_tunes_from_the_published_weights(demo_root, tmp_path, caplog):
    published = timm.create_model("nat_mini", num_classes=3, **TINY)
    torch.nn.init.normal_(published.head.weight)
    file = tmp_path / "nat_mini_published.pth"
    torch.save(published.state_dict(), file)
    kwargs = [f"model.kwargs.{k}={v}".replace(" ", "") for k, v in TINY.items()]
    with caplog.at_level(logging.INFO, logger="natzoo"):
        cfg, module = _module(demo_root, tmp_path, "model.pretrained=true",
                              f"+model.pretrained_cfg_overlay.file={file}", *kwargs)
    state = module.model.state_dict()
    reference = torch.load(file, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in reference.items() if not k.startswith("head."))
    assert state["head.weight"].shape[0] == 8  # the dataset's classes: a new head
    assert "pretrained" not in module.hparams.model_kwargs  # a checkpoint of this run never fetches weights again
    assert len([r for r in caplog.records if str(file) in r.getMessage()]) == 1
    assert len(_messages(caplog, "fine-tuning from the published weights of nat_mini")) == 1

    bad = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs")
                         + ["model.pretrained=true", f"checkpoint={file}"], tmp_path / "run2")
    with pytest.raises(ValueError, match="model.pretrained=true and checkpoint=.* both name the starting weights"):
        get_task("classification").validate_config(bad, "fit", None)
