"""Reliability, round three (issue 24): the new features' data paths (repeated augmentation, checkpoint averaging,
Hugging Face datasets), sweeps, run directories left behind, and config keys nobody reads.

Each test here failed on the code before the fix it guards (docs/reliability.md, section 13, lists them)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from natzoo import train
from natzoo.datasets import ensure_demo_dataset, generate_demo_dataset
from natzoo.testing import compose_config, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "demo"
    return ensure_demo_dataset(root, train_per_class=8, val_per_class=4, img_size=32, seed=0)


def _no_build(monkeypatch) -> None:
    """Fails the test if a model or a data module is built (the check must come first)."""
    from natzoo.classification import task as classification

    def forbidden(*args, **kwargs):
        raise AssertionError("built before the config check refused the run")

    monkeypatch.setattr(classification, "build_module", forbidden)
    monkeypatch.setattr(classification, "build_datamodule", forbidden)


def _python(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout, check=False)


# --- 1. data.aug_repeats on one process -------------------------------------------------------------------------------

def test_aug_repeats_on_one_process_is_refused_before_anything_is_built(demo_root, tmp_path, monkeypatch):
    # timm's sampler on one process drew 22 of 64 images per epoch (a very large value: one image 64 times), rc 0.
    _no_build(monkeypatch)
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs", epochs=1) + ["data.aug_repeats=3"],
                         tmp_path / "run")
    with pytest.raises(ValueError, match=r"data\.aug_repeats=3 .* one process: .* 1/3 of the training images"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_aug_repeats_loader_of_a_one_process_trainer_is_refused(demo_root):
    # The loader's own check, for trainers whose process count only Lightning knows (devices=auto on a GPU host).
    from natzoo.datasets.folder import ImageFolderDataModule

    module = ImageFolderDataModule(demo_root, img_size=32, batch_size=8, num_workers=0, aug_repeats=2)
    module.setup("fit")
    module.trainer = SimpleNamespace(world_size=1, global_rank=0)  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"data\.aug_repeats=2 .* one process"):
        module.train_dataloader()


# --- 2. python -m natzoo.averaging never overwrites an input or a foreign file ----------------------------------------

def _checkpoint(path: Path, value: float) -> Path:
    torch.save({"state_dict": {"w": torch.full((3,), value)}, "pytorch-lightning_version": "2.6.0", "epoch": 0,
                "global_step": 1, "hyper_parameters": {"model_name": "nat_mini"}}, path)
    return path


def test_averaging_cli_needs_a_named_output_and_never_replaces_an_input_or_a_foreign_file(tmp_path, capsys):
    from natzoo.tools.averaging import main

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    best, last = _checkpoint(folder / "best.ckpt", 1.0), _checkpoint(folder / "last.ckpt", 3.0)
    before = {p: p.read_bytes() for p in (best, last)}
    with pytest.raises(SystemExit) as exit_info:  # `python -m natzoo.averaging <run>/checkpoints/*.ckpt`
        main([str(best), str(last)])
    assert exit_info.value.code == 2 and "--output" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for output in (best, notes):
        with pytest.raises(SystemExit):
            main([str(best), str(last), "--output", str(output)])
    assert {p: p.read_bytes() for p in (best, last)} == before and notes.read_text() == "mine"

    averaged = tmp_path / "averaged.ckpt"
    main([str(best), str(last), "--output", str(averaged)])
    main([str(best), str(last), "-o", str(averaged)])  # an earlier average of natzoo's may be replaced
    torch.testing.assert_close(torch.load(averaged, weights_only=True)["state_dict"]["w"], torch.full((3,), 2.0))


# --- 3. data=hfds: each split's own ClassLabel -----------------------------------------------------------------------

def _png(colour: int) -> bytes:
    pixels = torch.zeros(8, 8, 3, dtype=torch.uint8)
    pixels[..., colour] = 200
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _saved(root: Path, val_names: list[str], val_colours: list[int]) -> Path:
    """A DatasetDict saved to disk: the training split lists (red, green, blue); the validation split lists
    ``val_names`` and stores, for the image of colour c, the index of that colour's name in its own list."""
    datasets = pytest.importorskip("datasets")
    colours = ["red", "green", "blue"]

    def split(names: list[str], image_colours: list[int]) -> object:
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        labels = [names.index(colours[c]) for c in image_colours]
        images = [{"bytes": _png(c), "path": None} for c in image_colours]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    datasets.DatasetDict(train=split(colours, [0, 1, 2] * 3), validation=split(val_names, val_colours)).save_to_disk(
        str(root))
    return root


def test_hfds_maps_each_splits_own_class_labels_by_name(tmp_path):
    from natzoo.datasets.readers import HfdsDataModule

    colours = [0, 1, 2, 2, 1, 0]
    root = _saved(tmp_path / "saved", ["blue", "red", "green"], colours)
    for with_train in (True, False):  # training, and evaluation (which opens the validation split only)
        module = HfdsDataModule(root, cache_dir=str(tmp_path / "cache"), img_size=8, batch_size=2, num_workers=0)
        module.setup("fit" if with_train else "validate")
        assert module.classes == ["red", "green", "blue"]
        assert [module.val_set[i][1] for i in range(len(colours))] == colours  # the image's colour is its class


def test_hfds_splits_with_different_classes_are_refused_naming_them(tmp_path):
    from natzoo.datasets.readers import HfdsDataModule

    root = _saved(tmp_path / "saved", ["red", "green", "blue", "black"], [0, 1, 2])
    module = HfdsDataModule(root, cache_dir=str(tmp_path / "cache"), img_size=8, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=r"split 'validation' lists other classes than split 'train' \(only in "
                                         r"'validation': \['black'\]"):
        module.setup("fit")


# --- 4. two sweeps of one run_name started in the same second ---------------------------------------------------------

# train.py under Hydra with its `now` resolver pinned, so that two processes start "in the same second".
_PINNED_NOW = """
import sys
from omegaconf import OmegaConf
import hydra._internal.hydra as hydra_main
import hydra._internal.core_plugins.basic_launcher as launcher
original = hydra_main.setup_globals

def pinned():
    original()
    OmegaConf.register_new_resolver("now", lambda pattern: "2026-01-01_00-00-00", use_cache=True, replace=True)

hydra_main.setup_globals = launcher.setup_globals = pinned
from natzoo.cli import train_main
sys.argv = ["train.py", *sys.argv[1:]]
train_main("script")
"""


@pytest.mark.slow
def test_two_sweeps_of_one_run_name_started_together_get_separate_directories(demo_root, tmp_path):
    logs = tmp_path / "logs"
    # fast_dev_run without replacing the debug=tiny preset: "debug=fdr" after it dropped the tiny dataset's
    # parameters, so both sweeps replaced the shared demo dataset at once (now they take turns, but the dataset of
    # this module is what they are meant to reuse).
    base = ["-c", _PINNED_NOW, "-m", *tiny_overrides(demo_root, logs, epochs=1), "run_name=same",
            "+trainer.fast_dev_run=true"]
    procs = [subprocess.Popen([sys.executable, *base, f"seed={seed}"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for seed in (1, 3)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    sweeps = sorted((logs / "same" / "multiruns").iterdir())
    assert [s.name for s in sweeps] == ["2026-01-01_00-00-00", "2026-01-01_00-00-00_2"]
    seeds = sorted((s / "0" / ".hydra" / "config.yaml").read_text().split("\nseed: ")[1].split()[0] for s in sweeps)
    assert seeds == ["1", "3"]


def test_two_runs_replacing_one_outdated_demo_dataset_at_once_both_get_the_new_one(tmp_path, monkeypatch):
    # Both runs found the outdated dataset and replaced it at once: one crashed in ownership.remove
    # (FileNotFoundError: the other had already moved the folder away).
    from natzoo.ownership import GeneratedFolder, Survey

    root = tmp_path / "data" / "demo"
    ensure_demo_dataset(root, train_per_class=1, val_per_class=1, img_size=8, seed=0)
    # The worst interleaving of two processes: each has inspected the folder before either acts on it (where one run
    # waits for the other, the wait ends after a second).
    both_looked = threading.Barrier(2, timeout=1.0)
    survey = GeneratedFolder.survey

    def survey_then_wait(self, folder, listed):
        found = survey(self, folder, listed)
        try:
            both_looked.wait()
        except threading.BrokenBarrierError:
            pass
        return found

    monkeypatch.setattr(GeneratedFolder, "survey", survey_then_wait)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ensure_demo_dataset(root, train_per_class=2, val_per_class=1, img_size=8, seed=0)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(os.listdir(root.parent)) == ["demo"]  # no scratch folder, no lock file, nothing half-written
    reference = generate_demo_dataset(tmp_path / "reference", train_per_class=2, val_per_class=1, img_size=8, seed=0)
    files = sorted(p.relative_to(reference).as_posix() for p in reference.rglob("*") if p.is_file())
    assert len(files) == 8 * 3 + 1
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == files
    assert all((root / rel).read_bytes() == (reference / rel).read_bytes() for rel in files)
    # Where the lock cannot be taken (a file system without flock), a folder that another run already moved away is
    # left to that run: the job is done, and no empty scratch folder stays behind.
    monkeypatch.setattr(GeneratedFolder, "survey", survey)
    gone = tmp_path / "gone"
    GeneratedFolder("tests", "RECORD.json", lambda rel: True).remove(gone, Survey({"RECORD.json": 2}, [], [], []))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "reference"]


# --- Partly fixed: a refused concurrent resume deleted the running resume's record -----------------------------------

def test_refused_resume_keeps_the_running_resumes_record(tmp_path):
    from natzoo.run import rundir

    run = tmp_path / "run"
    record = run / ".hydra" / "resumed_2026-01-01_00-00-00"
    record.mkdir(parents=True)  # written by the resume that holds the lock (another process)
    (record / "config.yaml").write_text("seed: 1\n")
    # The second resume, started in the same second, is refused by the lock; its clean-up must spare that record.
    assert not rundir.discard_unused(run, ".hydra/resumed_2026-01-01_00-00-00")
    assert (record / "config.yaml").read_text() == "seed: 1\n"
    # Its own record goes to a folder it claimed, which is what its clean-up removes.
    mine = rundir.claim_record_dir(run, "resumed_2026-01-01_00-00-00")
    assert mine == ".hydra/resumed_2026-01-01_00-00-00_2"
    (run / mine / "config.yaml").write_text("seed: 3\n")
    assert rundir.discard_unused(run, mine) and not (run / mine).exists()
    assert (record / "config.yaml").read_text() == "seed: 1\n"


# --- Partly fixed: empty run directories after failures and claims made before the overrides --------------------------

# train.py with the classification module's construction replaced: it fails (mode "raise") or the process is killed
# (mode "kill", as kill -9) once the config check has passed.
_FAIL_AFTER_CHECK = """
import os, signal, sys
from natzoo.classification.module import ClassificationModule
MODE = sys.argv[1]

def build(*args, **kwargs):
    if MODE == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("simulated failure after the config check")

ClassificationModule.__init__ = build
from natzoo.cli import train_main
sys.argv = ["train.py", *sys.argv[2:]]
train_main("script")
"""


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_failed_run_leaves_no_empty_directory_and_no_claim_of_another_name(demo_root, tmp_path, mode):
    logs = tmp_path / "mylogs"
    done = subprocess.run([sys.executable, "-c", _FAIL_AFTER_CHECK, mode, *tiny_overrides(demo_root, logs, epochs=1),
                           "model=nat_mini"], cwd=tmp_path, env=dict(ENV, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode != 0
    if mode == "raise":
        assert "simulated failure after the config check" in done.stderr
    # Hydra resolved the run directory before applying paths.log_dir: that claim under ./logs is gone, even after
    # kill -9, and the run's own directory goes when the run failed without a result.
    assert not (tmp_path / "logs").exists(), sorted(str(p) for p in (tmp_path / "logs").rglob("*"))
    runs = sorted((logs / "demo-nat_mini" / "runs").iterdir()) if (logs / "demo-nat_mini" / "runs").exists() else []
    assert [r.name.count("_") for r in runs] == ([] if mode == "raise" else [1])  # no `<timestamp>_2` name


# --- Partly fixed: the printed eval command keeps what a debug preset changed in the data ------------------------------

def test_evaluate_with_command_of_a_debug_tiny_run_scores_the_runs_own_dataset(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from natzoo.run.hydra_setup import register_with_hydra
    from natzoo.testing import CONFIG_DIR
    from natzoo.run.training import _eval_overrides

    register_with_hydra()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        run = compose("train", overrides=["debug=tiny", f"paths.data_dir={tmp_path}"], return_hydra_config=True)
        HydraConfig.instance().set_config(run)
        try:
            words = _eval_overrides(run)
        finally:
            HydraConfig.instance().cfg = None
        # What `python eval.py <words> ckpt_path=...` composes (the words are shell words; these need no unquoting).
        evaluation = compose("eval", overrides=words)
    assert evaluation.data.root == run.data.root
    assert evaluation.data.generate == run.data.generate  # 8 + 4 images per class, not the full demo's 300 + 50


# --- Regression: a log folder that cannot be written ------------------------------------------------------------------

def test_a_log_folder_that_cannot_be_created_is_one_error_line(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")  # a read-only folder behaves alike, but root may write there anyway
    done = _python(["train.py", "debug=tiny", f"paths.log_dir={blocker / 'logs'}", f"paths.data_dir={tmp_path}"])
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith(f"Error: cannot create the run directory {blocker / 'logs'}") and "paths.log_dir" \
        in errors[-1]
    assert not any("Traceback" in line or "Hydra's exception formatting" in line for line in errors), errors
    assert blocker.read_text() == "not a folder"


# --- Poor: accepted bad values, keys nobody reads --------------------------------------------------------------------

def _with_command_line(config_name: str, overrides: list[str], tmp_path: Path):
    """The config as ``train.py``/``eval.py`` compose it, with Hydra's record of the command line set."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from natzoo.run.hydra_setup import register_with_hydra
    from natzoo.testing import CONFIG_DIR

    register_with_hydra()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


@pytest.mark.parametrize("stage, added, message", [
    ("fit", "+pretrained=true", r"train\.py does not use 'pretrained' .* pass checkpoint=<file>"),
    ("fit", "+optim.lrr=0.1", r"no setting 'optim\.lrr' exists in train\.py's config"),
    ("fit", "+seeds=3", r"no setting 'seeds' exists"),
    ("eval", "+sched.epochs=3", r"eval\.py does not use 'sched\.epochs'"),
])
def test_a_key_added_with_plus_that_nothing_reads_is_refused(demo_root, tmp_path, monkeypatch, stage, added,
                                                             message):
    from hydra.core.hydra_config import HydraConfig

    from natzoo.run.training import check_run_config

    _no_build(monkeypatch)
    extra = [] if stage == "fit" else ["random_weights=true"]
    try:
        cfg = _with_command_line("train" if stage == "fit" else "eval",
                                 [f"data.root={demo_root}", "debug=tiny" if stage == "fit" else "seed=0", *extra,
                                  added], tmp_path)
        with pytest.raises(ValueError, match=message):
            check_run_config(cfg, stage)
    finally:
        HydraConfig.instance().cfg = None


def test_keys_added_to_tables_handed_on_are_accepted(demo_root, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from natzoo.run.training import check_added_keys

    try:
        added = ["+trainer.enable_progress_bar=false", "+model.kwargs.kernel_size=5", "+callbacks.x._target_=a.B",
                 "++data.root=x", "+trainer.fast_dev_run=true"]
        check_added_keys(added, {}, "fit")
        check_added_keys(["+trainer.enable_progress_bar=false", "+pretrained=true"], {"pretrained": None}, "eval")
    finally:
        HydraConfig.instance().cfg = None


def test_bce_target_threshold_of_zero_is_refused(demo_root, tmp_path, monkeypatch):
    _no_build(monkeypatch)
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs") + ["loss.name=bce",
                                                                                "loss.bce_target_threshold=0"],
                         tmp_path / "run")
    with pytest.raises(ValueError, match=r"loss\.bce_target_threshold=0.*in \(0, 1\)"):
        train(cfg)


# --- Poor: WebDataset shards that lie --------------------------------------------------------------------------------

def _shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for suffix, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def _wds_overrides(root: Path, log_dir: Path, *extra: str) -> list[str]:
    tiny = [o for o in tiny_overrides("unused", log_dir, epochs=1) if not o.startswith("data.")]
    return tiny + ["data=wds", f"data.root={root}", "data.num_classes=3", "data.train_split=train-0000.tar",
                   "data.val_split=val-0000.tar", "data.train_samples=4", "data.val_samples=4", "data.img_size=8",
                   "data.eval_transform.crop_pct=1.0", "data.batch_size=2", "data.num_workers=0", *extra]


@pytest.mark.parametrize("case, message", [
    ("no_cls", r"sample 'v0' of shard .*val-0000\.tar has no \.cls label file \(it holds \['png'\]\)"),
    ("label_7", r"label 7, outside 0\.\.2 \(data\.num_classes=3\)"),
])
def test_wds_samples_without_a_label_or_with_one_out_of_range_are_named(tmp_path, case, message):
    pytest.importorskip("webdataset")
    from natzoo.classification.task import build_datamodule

    files = {"png": _png(0)} if case == "no_cls" else {"png": _png(0), "cls": b"7"}
    _shard(tmp_path / "val-0000.tar", [(f"v{i}", files) for i in range(4)])
    _shard(tmp_path / "train-0000.tar", [(f"t{i}", {"png": _png(0), "cls": b"0"}) for i in range(4)])
    module = build_datamodule(compose_config("train", _wds_overrides(tmp_path, tmp_path / "logs")))
    module.setup("validate")
    with pytest.raises(RuntimeError, match=message):
        next(iter(module.val_dataloader()))


def test_a_run_that_trained_zero_steps_does_not_report_success(tmp_path):
    pytest.importorskip("webdataset")
    _shard(tmp_path / "train-0000.tar", [])  # an empty shard
    _shard(tmp_path / "val-0000.tar", [(f"v{i}", {"png": _png(i % 3), "cls": str(i % 3).encode()}) for i in range(4)])
    cfg = compose_config("train", _wds_overrides(tmp_path, tmp_path / "logs"), tmp_path / "run")
    with pytest.raises(RuntimeError, match=r"training ran 0 optimizer steps: the training data yielded no batch"):
        train(cfg)


def test_ckpt_path_last_refuses_the_newest_run_of_another_seed(demo_root, tmp_path):
    from natzoo.run.tasks import get_task
    from natzoo.run.training import _checkpoint_of

    runs = tmp_path / "logs" / "demo-nat_mini" / "runs"
    written = {}
    for name, seed in (("2026-01-01_00-00-00", 3), ("2026-01-01_00-00-05", 1)):  # seed 1's run is the newer
        (runs / name / ".hydra").mkdir(parents=True)
        (runs / name / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nrun_name: demo-nat_mini\n")
        (runs / name / "checkpoints").mkdir()
        written[seed] = _checkpoint(runs / name / "checkpoints" / "last.ckpt", float(seed))
        stamp = 1_700_000_000 + 5 * len(written)
        os.utime(written[seed], (stamp, stamp))
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs") + ["ckpt_path=last", "seed=3"])
    with pytest.raises(ValueError, match=rf"written by a run with seed=1, but this command has seed=3: pass seed=1 .*"
                                         rf"ckpt_path={written[3]} continues this seed's newest run"):
        _checkpoint_of(cfg, get_task("classification"))
    same_seed = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs") + ["ckpt_path=last", "seed=1"])
    from natzoo.checkpoints import resolve_ckpt_path
    from natzoo.run.training import _check_last_is_this_seeds

    found = resolve_ckpt_path("last", str(same_seed.paths.resume_dir))
    assert found is not None and found.path == str(written[1])
    _check_last_is_this_seeds(found.path, 1, same_seed.paths.resume_dir)  # this seed's own newest run: accepted


def test_a_fresh_run_into_a_directory_holding_another_run_is_refused(demo_root, tmp_path, monkeypatch):
    _no_build(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step\n0,7\n")
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs"), run)
    with pytest.raises(ValueError, match=r"already holds another run's metrics\.csv: .* ckpt_path="):
        train(cfg)
    assert (run / "metrics.csv").read_text() == "epoch,step\n0,7\n"


@pytest.mark.parametrize("extra, message", [
    (["callbacks=default", "callbacks.timm_model.enabled=true", "callbacks.timm_model.use_ema=true"],
     r"callbacks\.timm_model\.use_ema=true exports the EMA weights, but this run keeps none"),
    (["callbacks=default", "callbacks.average_checkpoints.top_k=2", "callbacks.average_checkpoints.monitor=val/acc"],
     r"callbacks\.average_checkpoints\.monitor='val/acc' is not a metric this run logs; choose one of \['val/loss'"),
    (["logger=wandb"], r"logger\.wandb needs the wandb package"),
])
def test_settings_that_failed_after_training_are_refused_by_the_config_check(demo_root, tmp_path, monkeypatch, extra,
                                                                              message):
    import importlib.util

    find_spec = importlib.util.find_spec
    # as if wandb were not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    _no_build(monkeypatch)
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs") + extra, tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        train(cfg)


def test_resume_with_another_layer_decay_is_refused(demo_root, tmp_path):
    from natzoo.checkpoints import CheckpointInfo
    from natzoo.classification.task import _module_kwargs, resume_differences
    from natzoo.run.tasks import check_resume

    saved = _module_kwargs(compose_config("train", tiny_overrides(demo_root, tmp_path / "logs")), 8)
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs") + ["ckpt_path=x.ckpt",
                                                                                "optim.layer_decay=0.75"])
    info = CheckpointInfo("x.ckpt", saved)
    with pytest.raises(ValueError, match=r"optim\.layer_decay: checkpoint None, config 0\.75"):
        check_resume(cfg, info, resume_differences(cfg, info))


def test_resume_onto_renamed_class_folders_is_refused(tmp_path):
    """Same class count, another class name: resuming would train every output on another class without a word.
    The checkpoint records its class names (natzoo_model), so the resume is refused, naming both lists."""
    from natzoo.checkpoints import CheckpointInfo
    from natzoo.classification.task import _module_kwargs, resume_differences
    from natzoo.run.tasks import check_resume

    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / "mine" / split / name).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(tmp_path / "mine" / split / name / "0.png")
    overrides = ["debug=tiny", "data=folder", f"data.root={tmp_path / 'mine'}", f"paths.log_dir={tmp_path / 'logs'}"]
    saved = _module_kwargs(compose_config("train", overrides), 2)
    same = CheckpointInfo("x.ckpt", saved, label_names=("cat", "dog"))
    cfg = compose_config("train", overrides + ["ckpt_path=x.ckpt"], tmp_path / "run")
    check_resume(cfg, same, resume_differences(cfg, same))  # the classes it was trained on: resumes
    (tmp_path / "mine" / "train" / "dog").rename(tmp_path / "mine" / "train" / "wolf")
    (tmp_path / "mine" / "val" / "dog").rename(tmp_path / "mine" / "val" / "wolf")
    with pytest.raises(ValueError, match=r"classes: checkpoint \['cat', 'dog'\], config \['cat', 'wolf'\]"):
        check_resume(cfg, same, resume_differences(cfg, same))


def test_debug_tiny_with_data_folder_trains_on_the_users_folder(tmp_path):
    from natzoo.run.training import check_run_config

    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / "mine" / split / name).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(tmp_path / "mine" / split / name / "0.png")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "mine").rglob("*"))
    cfg = compose_config("train", ["debug=tiny", "data=folder", f"data.root={tmp_path / 'mine'}",
                                   f"paths.log_dir={tmp_path / 'logs'}"], tmp_path / "run")
    check_run_config(cfg, "fit")  # was refused: "not a demo dataset natzoo generated ... use data=folder"
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "mine").rglob("*")) == before


# --- Poor: errors that named nothing --------------------------------------------------------------------------------

def test_load_from_checkpoint_with_a_plain_state_dict_names_the_file(tmp_path):
    from natzoo.classification.module import ClassificationModule

    path = tmp_path / "weights.pth"
    torch.save({"head.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match=rf"checkpoint_path='{path}' is not a Lightning checkpoint: .* give other "
                                         r"weight files .* as checkpoint="):
        ClassificationModule.load_from_checkpoint(path, weights_only=True)


def test_attention_maps_name_a_block_or_head_out_of_range():
    import timm

    import natzoo.models  # noqa: F401  (registers the model family with timm)
    from natzoo.tools.attention_maps import attention_maps

    model = timm.create_model("nat_mini", num_classes=2, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                              kernel_size=3)
    image = torch.randn(3, 32, 32)
    with pytest.raises(ValueError, match=r"block=3, but stage 0 has 1 attention module\(s\) \(block in -1\.\.0"):
        attention_maps(model, image, (3, 3), block=3)
    maps = attention_maps(model, image, (3, 3))
    with pytest.raises(ValueError, match=r"head=2, but this stage has 1 heads \(0\.\.0"):
        maps[0].weight_map(head=2)


def test_a_bce_setting_with_cross_entropy_and_an_unknown_trainer_argument_are_refused(demo_root, tmp_path,
                                                                                      monkeypatch):
    from natzoo.run.training import check_added_keys

    _no_build(monkeypatch)
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs") + ["loss.bce_target_threshold=0.2"],
                         tmp_path / "run")
    with pytest.raises(ValueError, match=r"loss\.bce_target_threshold=0\.2 applies to loss\.name=bce only"):
        train(cfg)
    with pytest.raises(ValueError, match=r"\+trainer\.bogus=1: Lightning's Trainer has no argument 'bogus'"):
        check_added_keys(["+trainer.bogus=1"], {}, "fit")


@pytest.mark.parametrize("extra, message", [
    (["trainer.limit_train_batches=0"], r"trainer\.limit_train_batches=0: expected an integer >= 1 or a finite "),
    (["ckpt_path=/etc/hostname"], r"ckpt_path='/etc/hostname' cannot be read as a PyTorch checkpoint"),
])
def test_late_or_nameless_errors_are_config_errors_naming_the_key(demo_root, tmp_path, monkeypatch, extra, message):
    _no_build(monkeypatch)
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs") + extra, tmp_path / "run")
    with pytest.raises(ValueError, match=message) as caught:
        train(cfg)
    assert getattr(caught.value, "natzoo_config_error", False)


def test_gpu_accelerator_without_a_gpu_is_refused_before_anything_is_built(demo_root, tmp_path, monkeypatch):
    _no_build(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs") + ["trainer.accelerator=gpu"],
                         tmp_path / "run")
    with pytest.raises(ValueError, match=r"trainer\.accelerator='gpu' but no CUDA GPU is visible"):
        train(cfg)


def test_model_argument_errors_are_printed_as_config_errors(demo_root, tmp_path):
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs") + ["model.kwargs.embed_dim=-8"],
                         tmp_path / "run")
    with pytest.raises(ValueError, match="embed_dim must be >= 1, got -8") as caught:
        train(cfg)
    assert getattr(caught.value, "natzoo_config_error", False)  # one `Error: ...` line, no traceback


def test_hfds_folder_that_is_not_a_saved_dataset_and_a_missing_split_are_named(tmp_path):
    pytest.importorskip("datasets")
    from natzoo.datasets.readers import check_reader_source

    target = "natzoo.datasets.readers.HfdsDataModule"
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"is not a Hugging Face dataset saved with save_to_disk"):
        check_reader_source({"_target_": target, "root": str(tmp_path / "images")}, "fit")
    root = _saved(tmp_path / "saved", ["red", "green", "blue"], [0, 1, 2])
    with pytest.raises(ValueError, match=r"data\.val_split='valid' is not a split of the dataset .* \['train', "
                                         r"'validation'\]"):
        check_reader_source({"_target_": target, "root": str(root), "train_split": "train", "val_split": "valid"},
                            "fit")


def test_coco_image_entry_with_a_wrong_size_is_named_not_just_boxes_outside(tmp_path):
    import json

    pytest.importorskip("pycocotools")
    from natzoo.datasets.coco import CocoDetectionDataset

    (tmp_path / "images").mkdir()
    Image.new("RGB", (200, 100)).save(tmp_path / "images" / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}],  # the real image is 200x100
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 40, 30, 30], "area": 900.0,
                             "iscrowd": 0}]}
    (tmp_path / "instances.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"1 outside the image; image a\.png is 200x100 on disk but the annotation "
                                         r"file says 20x10"):
        CocoDetectionDataset(tmp_path / "images", tmp_path / "instances.json", train=False)
