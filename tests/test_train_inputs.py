"""Bad inputs to train.py / eval.py are answered before anything is built, naming the key or file and what was
expected: config values of the wrong type or out of range, checkpoint files of the wrong kind, evaluation without
weights."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from natzoo import evaluate, train
from natzoo.classification import task as classification_task
from natzoo.classification.module import ClassificationModule
from natzoo.datasets import ensure_demo_dataset
from natzoo.detection.module import DetectionModule
from natzoo.testing import compose_config, tiny_overrides


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "demo"
    return ensure_demo_dataset(root, train_per_class=8, val_per_class=4, img_size=32, seed=0)


@pytest.fixture
def nothing_built(monkeypatch):
    """Preparing data (the demo generator, folder scans) or building a data module or model fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("data or a model was prepared before the config was checked")

    monkeypatch.setattr(classification_task, "_prepare_data", forbidden)
    monkeypatch.setattr(classification_task, "build_datamodule", forbidden)
    monkeypatch.setattr(ClassificationModule, "__init__", forbidden)
    monkeypatch.setattr(DetectionModule, "__init__", forbidden)


def _train_cfg(demo_root: Path, tmp_path: Path, *extra: str):
    return compose_config("train", tiny_overrides(demo_root, tmp_path / "logs", epochs=1) + list(extra), tmp_path / "r")


def _eval_cfg(demo_root: Path, tmp_path: Path, *extra: str):
    overrides = [f"data.root={demo_root}", "data.generate.train_per_class=8", "data.generate.val_per_class=4",
                 "+trainer.enable_progress_bar=false", *extra]
    return compose_config("eval", overrides, tmp_path / "eval")


# (override, exception type, message): each names the key and the value and says what was expected.
TRAIN_CASES = [
    ("optim.lr=abc", TypeError, "optim.lr='abc': expected a finite number > 0"),
    ("optim.lr=-1", ValueError, "optim.lr=-1: expected a finite number > 0"),
    ("optim.lr=0", ValueError, "optim.lr=0: expected a finite number > 0"),
    ("seed=abc", TypeError, "seed='abc': expected an integer in [0, 4.29497e+09]"),
    ("seed=-3", ValueError, "seed=-3: expected an integer in [0, 4.29497e+09]"),
    ("optim.weight_decay=-0.1", ValueError, "optim.weight_decay=-0.1: expected a finite number >= 0"),
    ("optim.betas=[0.9]", ValueError, "optim.betas=[0.9]: expected a list of 2 values"),
    ("optim.betas=[0.9,1.5]", ValueError, "optim.betas=[0.9, 1.5]: expected a list of 2 values, each a finite number"),
    ("optim.name=adamx", ValueError, "optim.name='adamx': expected an optimizer name of timm.optim.list_optimizers()"),
    ("optim.scale_lr=yes", TypeError, "optim.scale_lr='yes': expected true or false"),
    ("optim.lr_base_batch=0", ValueError, "optim.lr_base_batch=0: expected an integer >= 1"),
    ("sched.name=linear", ValueError, "sched.name='linear': expected one of 'cosine', 'constant', 'warmup_step'"),
    ("sched.epochs=0", ValueError, "sched.epochs=0: expected an integer >= 1"),
    ("sched.epochs=2.5", TypeError, "sched.epochs=2.5: expected an integer >= 1"),
    ("sched.warmup_epochs=-1", ValueError, "sched.warmup_epochs=-1: expected a finite number >= 0"),
    ("sched.min_lr=nan", ValueError, "sched.min_lr=nan: expected a finite number >= 0"),
    ("data.img_size=abc", TypeError, "data.img_size='abc': expected an integer >= 8 or null"),
    ("data.mixup.prob=2", ValueError, "data.mixup.prob=2: expected a finite number in [0, 1]"),
    ("data.mixup.mode=row", ValueError, "data.mixup.mode='row': expected one of 'batch', 'pair', 'elem'"),
    ("data.mixup.label_smoothing=1.0", ValueError, "label_smoothing=1.0: expected a finite number in [0, 1)"),
    ("data.train_transform.hflip=1.5", ValueError, "train_transform.hflip=1.5: expected a finite number in [0, 1]"),
    ("data.eval_transform.crop_pct=0", ValueError, "eval_transform.crop_pct=0: expected a finite number in (0, 1]"),
    ("data.eval_transform.interpolation=cubic", ValueError, "interpolation='cubic': expected one of"),
    ("data.bad_images=ignore", ValueError, "data.bad_images='ignore': expected one of 'error', 'skip'"),
    ("data.generate.train_per_class=0", ValueError, "data.generate.train_per_class=0: expected an integer >= 1"),
    ("model.drop_path_rate=1.0", ValueError, "model.drop_path_rate=1.0: expected a finite number in [0, 1) or null"),
    ("model.freeze=patch_embed", TypeError, "model.freeze='patch_embed': expected a list of values, each a non-empty"),
    ("ema.decay=1.1", ValueError, "ema.decay=1.1: expected a finite number in [0, 1]"),
    ("ema.enabled=1", TypeError, "ema.enabled=1: expected true or false"),
    ("trainer.precision=17", ValueError, "trainer.precision=17: expected one of"),
    ("trainer.max_epochs=0", ValueError, "trainer.max_epochs=0: expected an integer >= 1 or null"),
    ("trainer.gradient_clip_val=-5", ValueError, "trainer.gradient_clip_val=-5: expected a finite number >= 0 or null"),
    ("trainer.gradient_clip_algorithm=l2", ValueError, "trainer.gradient_clip_algorithm='l2': expected one of"),
    ("trainer.accumulate_grad_batches=0", ValueError, "trainer.accumulate_grad_batches=0: expected an integer >= 1"),
    ("trainer.limit_train_batches=1.5", ValueError, "trainer.limit_train_batches=1.5: expected an integer >= 1 or"),
    ("cpu_threads=0", ValueError, "cpu_threads=0: expected an integer in [1, "),
    ("compile=maybe", TypeError, "compile='maybe': expected true or false or a mapping"),
    ("channels_last=2", TypeError, "channels_last=2: expected true or false"),
]


@pytest.mark.parametrize("override, kind, message", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_train_values_fail_before_anything_is_built(demo_root, tmp_path, nothing_built, override, kind, message):
    with pytest.raises(kind, match=re.escape(message)):
        train(_train_cfg(demo_root, tmp_path, override))


EVAL_CASES = [
    ("confusion_matrix=sometimes", ValueError, "confusion_matrix='sometimes': expected one of 'auto', true, false"),
    ("random_weights=yes", TypeError, "random_weights='yes': expected true or false"),
    ("use_ema=1", TypeError, "use_ema=1: expected true or false"),
    ("data.eval_batch_size=0", ValueError, "data.eval_batch_size=0: expected an integer >= 1 or null"),
    ("seed=1e3", TypeError, "seed=1000.0: expected an integer"),
]


@pytest.mark.parametrize("override, kind, message", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_bad_eval_values_fail_before_anything_is_built(demo_root, tmp_path, nothing_built, override, kind, message):
    with pytest.raises(kind, match=re.escape(message)):
        evaluate(_eval_cfg(demo_root, tmp_path, "random_weights=true", override))


DETECTION_CASES = [
    ("model.arch=yolo", ValueError, "model.arch='yolo': expected one of 'fasterrcnn', 'maskrcnn'"),
    ("model.frozen_stages=9", ValueError, "model.frozen_stages=9: expected an integer in [-1, 5]"),
    ("model.out_indices=[0,4]", ValueError, "model.out_indices=[0, 4]: expected a list of values, each an integer"),
    ("sched.gamma=0", ValueError, "sched.gamma=0: expected a finite number > 0"),
    ("sched.milestone_unit=iter", ValueError, "sched.milestone_unit='iter': expected one of 'epoch', 'step'"),
    ("sched.warmup_ratio=0", ValueError, "sched.warmup_ratio=0: expected a finite number in (0, 1]"),
]


@pytest.mark.parametrize("override, kind, message", DETECTION_CASES, ids=[c[0] for c in DETECTION_CASES])
def test_bad_detection_values_fail_before_anything_is_built(tmp_path, nothing_built, override, kind, message):
    cfg = compose_config("train", ["experiment=detection_demo", f"paths.data_dir={tmp_path}", override], tmp_path)
    with pytest.raises(kind, match=re.escape(message)):
        train(cfg)
    assert not any(tmp_path.glob("coco_shapes*")), "the demo dataset was generated before the check"


def test_module_arguments_are_checked_when_built():
    with pytest.raises(ValueError, match=re.escape("ClassificationModule.num_classes=0: expected an integer >= 1")):
        ClassificationModule("nat_mini", 0)
    with pytest.raises(TypeError, match=re.escape("optim.lr='abc': expected a finite number > 0")):
        ClassificationModule("nat_mini", 4, optim={"lr": "abc"})
    with pytest.raises(ValueError, match=re.escape("optim settings lack ['optim.name'")):
        ClassificationModule("nat_mini", 4, optim={"lr": 1e-3})
    with pytest.raises(ValueError, match=re.escape("data.mixup.prob=3: expected a finite number in [0, 1]")):
        ClassificationModule("nat_mini", 4, mixup={"mixup_alpha": 0.8, "prob": 3})
    with pytest.raises(ValueError, match=re.escape("DetectionModule.mask_threshold=2: expected a finite number in")):
        DetectionModule({}, mask_threshold=2)


# ---------------------------------------------------------------------------------------------------------------
# ckpt_path= files: missing, a directory, empty, unreadable, pickled code, the wrong kind, another task's.


class _Payload:
    """An arbitrary pickled object: loading it would run code, so it must be refused."""


def _bad_checkpoints(tmp_path: Path) -> list[tuple[str, Path, str]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"x": torch.zeros(1)}, folder / "checkpoints" / "last.ckpt")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "pytorch-lightning_version": "2.6"}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    code = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6", "obj": _Payload()}, code)
    plain_state = tmp_path / "weights.pth"
    torch.save({"head.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}, plain_state)
    with open(tmp_path / "pickle.ckpt", "wb") as f:
        pickle.dump([1, 2, 3], f, protocol=2)
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    return [
        ("missing", tmp_path / "nope.ckpt", "does not exist; ckpt_path= takes the Lightning .ckpt files"),
        ("directory", folder, "is a directory, not a checkpoint file (it holds e.g. "),
        ("empty", empty, "is an empty file (0 bytes), not a checkpoint"),
        ("text", text, "cannot be read as a PyTorch checkpoint"),
        ("truncated", truncated, "cannot be read as a PyTorch checkpoint"),
        ("code", code, "holds pickled objects other than tensors and plain values; it is not loaded"),
        ("state dict", plain_state, "is not a Lightning checkpoint: it holds a plain state dict of 2 tensors"),
        ("plain pickle", tmp_path / "pickle.ckpt", "cannot be read as a PyTorch checkpoint"),
        ("list", tmp_path / "list.ckpt", "is not a Lightning checkpoint: it holds a list"),
    ]


@pytest.mark.parametrize("case", range(9), ids=["missing", "directory", "empty", "text", "truncated", "code",
                                                "state dict", "plain pickle", "list"])
def test_bad_ckpt_path_files_are_named_with_what_was_expected(demo_root, tmp_path, nothing_built, case):
    _, path, message = _bad_checkpoints(tmp_path / "files")[case]
    for cfg in (_train_cfg(demo_root, tmp_path, f"ckpt_path='{path}'"),
                _eval_cfg(demo_root, tmp_path, f"ckpt_path='{path}'")):
        with pytest.raises(ValueError) as info:
            (train if "sched" in cfg else evaluate)(cfg)
        assert f"ckpt_path={str(path)!r} " in str(info.value) and message in str(info.value)


def test_ckpt_of_another_task_names_the_task(demo_root, tmp_path):
    path = tmp_path / "detector.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6",
                "hyper_parameters": {"detector": {}, "optim": None, "sched": None}}, path)
    with pytest.raises(ValueError, match=r"was not written by the classification task's module; it is a detection "
                                         r"checkpoint: add task=detection"):
        evaluate(_eval_cfg(demo_root, tmp_path, f"ckpt_path={path}"))


# ---------------------------------------------------------------------------------------------------------------
# eval.py without weights.


def test_eval_without_weights_refuses_and_lists_the_sources(demo_root, tmp_path, nothing_built):
    with pytest.raises(ValueError) as info:
        evaluate(_eval_cfg(demo_root, tmp_path))
    message = str(info.value)
    assert message.startswith("no weights to evaluate")
    for source in ("ckpt_path=", "checkpoint=", "pretrained=true", "random_weights=true"):
        assert source in message
    with pytest.raises(ValueError, match=r"random_weights=true contradicts checkpoint="):
        evaluate(_eval_cfg(demo_root, tmp_path, "random_weights=true", "checkpoint=/some/weights.pth"))


def test_eval_with_random_weights_when_asked(demo_root, tmp_path):
    result = evaluate(_eval_cfg(demo_root, tmp_path, "random_weights=true", "confusion_matrix=false"))
    assert result["source"]["random_weights"] is True and result["num_images"] == 32
