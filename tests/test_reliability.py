"""Reliability, round two: shared run directories, resume with a changed config, EMA on every route, exit status,
data that lies (symlink loops, empty folders, decompression bombs, invalid boxes), knob bounds, export paths.

Each test here failed on the code before the fix it guards (docs/reliability.md lists them)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from natzoo import evaluate, train
from natzoo.datasets import ensure_demo_dataset
from natzoo.testing import compose_config, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["++model.kwargs.embed_dim=16", "++model.kwargs.depths=[1,1,1,1]", "++model.kwargs.num_heads=[1,1,2,2]",
              "++model.kwargs.kernel_size=3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "demo"
    return ensure_demo_dataset(root, train_per_class=8, val_per_class=4, img_size=32, seed=0)


@pytest.fixture(scope="module")
def ema_run(demo_root, tmp_path_factory) -> Path:
    """One tiny epoch with EMA; returns its last.ckpt."""
    tmp = tmp_path_factory.mktemp("ema_run")
    cfg = compose_config("train", tiny_overrides(demo_root, tmp / "logs", epochs=1)
                         + ["ema.enabled=true", "ema.decay=0.5"], tmp / "run")
    return Path(train(cfg)["last_checkpoint"])


def _eval_cfg(demo_root: Path, tmp_path: Path, *extra: str):
    return compose_config("eval", [f"data.root={demo_root}", "data.generate.train_per_class=8",
                                   "data.generate.val_per_class=4", "+trainer.enable_progress_bar=false", *extra],
                          tmp_path / "eval")


def _run(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout, check=False)


# --- Bad 1, 2: one writer per run directory, unique temporary names --------------------------------------------------

def test_fresh_run_directories_are_unique_per_process(tmp_path):
    # Two processes claiming the same timestamped name (two runs of one run_name in the same second).
    # Each writes a file into its directory as a run does (Hydra's record): a claim left empty is removed at exit.
    code = ("import sys; from natzoo.run.rundir import claim_fresh_dir; d = claim_fresh_dir(sys.argv[1]); "
            "open(d + '/record', 'w').close(); print(d)")
    candidate = str(tmp_path / "logs" / "same" / "runs" / "2026-01-01_00-00-00")
    procs = [subprocess.Popen([sys.executable, "-c", code, candidate], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    claimed = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert len(set(claimed)) == 3 and all(Path(c).is_dir() for c in claimed)
    assert candidate in claimed


def test_a_claimed_run_directory_left_empty_is_removed_at_exit(tmp_path):
    # `--cfg job` and a process that stops while composing claim a directory and never write into it.
    code = "import sys; from natzoo.run.rundir import claim_fresh_dir; print(claim_fresh_dir(sys.argv[1]))"
    candidate = tmp_path / "logs" / "run" / "runs" / "2026-01-01_00-00-00"
    done = subprocess.run([sys.executable, "-c", code, str(candidate)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == str(candidate)
    assert list(tmp_path.iterdir()) == []  # the directory and the parents the process created for it are gone


@pytest.mark.slow
def test_two_runs_started_together_get_separate_directories(demo_root, tmp_path):
    # train.yaml's run directory with the timestamp pinned: both runs start "in the same second".
    logs = tmp_path / "logs"
    pinned = "hydra.run.dir='${natzoo_run_dir:${ckpt_path},${paths.resume_dir},${paths.log_dir}/same/runs/2026-01-01}'"
    base = ["train.py", *tiny_overrides(demo_root, logs, epochs=1), "run_name=same", pinned]
    procs = [subprocess.Popen([sys.executable, *base, f"seed={s}"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for s in (1, 2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    runs = sorted((logs / "same" / "runs").iterdir())
    assert [run.name for run in runs] == ["2026-01-01", "2026-01-01_2"]
    seeds = sorted((run / ".hydra" / "overrides.yaml").read_text().split("seed=")[1].split()[0] for run in runs)
    assert seeds == ["1", "2"]
    for run in runs:  # each metrics.csv holds one run: one validation row for its one epoch
        rows = (run / "metrics.csv").read_text().splitlines()
        assert sum(1 for r in rows[1:] if r.split(",")[rows[0].split(",").index("val/acc1")]) == 1


def test_second_writer_into_a_run_directory_is_refused(demo_root, tmp_path):
    from natzoo.run.rundir import RunDirectoryBusy, RunDirLock

    run = tmp_path / "run"
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs", epochs=1), run)
    with RunDirLock(run), pytest.raises(RunDirectoryBusy, match=f"run directory {run} is in use by natzoo run pid"):
        train(cfg)
    assert not (run / "metrics.csv").exists() and not (run / "checkpoints").exists()


def test_temporary_files_have_names_of_their_own(tmp_path):
    # The fixed temporary name of the curve plot made the second of two writers crash; something else at that name
    # (here a folder) must not matter.
    from natzoo.plots import plot_curves

    (tmp_path / ".curves.png.tmp.png").mkdir()
    history = [{"epoch": 0, "val/loss": 1.0}, {"epoch": 1, "val/loss": 0.5}]
    plot_curves(history, tmp_path / "curves.png", {"loss": (("val/loss", "val loss"),)})
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".curves.png.tmp.png", "curves.png"]


# --- No litter, config errors without a traceback --------------------------------------------------------------------

def test_failed_config_check_leaves_no_run_directory_and_no_traceback(tmp_path):
    logs = tmp_path / "logs"
    result = _run(["train.py", "optim.lr=-1", f"paths.log_dir={logs}", "run_name=bad"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Error: optim.lr=-1: expected a finite number > 0" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not logs.exists() or not any(logs.rglob("*")), sorted(logs.rglob("*"))


# --- Exit status: SIGTERM and Ctrl-C non-zero; errors reported as errors ---------------------------------------------

@pytest.mark.slow
def test_sigterm_exits_non_zero_with_the_resume_command(demo_root, tmp_path):
    from natzoo.run.training import SIGTERM_EXIT_CODE

    args = ["train.py", *tiny_overrides(demo_root, tmp_path / "logs", epochs=2),
            "+callbacks.term._target_=natzoo.testing.SigtermAtStep", "+callbacks.term.step=10"]
    result = _run(args, tmp_path)
    assert result.returncode == SIGTERM_EXIT_CODE == 143, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Stopped by SIGTERM. Resume from " in result.stdout
    assert "Done." not in result.stdout


def test_an_error_in_fit_is_reported_as_an_error_not_an_interrupt(demo_root, tmp_path, capsys):
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs", epochs=1)
                         + ["+callbacks.crash._target_=natzoo.testing.CrashAtStep", "+callbacks.crash.step=2"],
                         tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    out = capsys.readouterr().out
    assert "Training stopped by an error" in out and "Interrupted" not in out


# --- Resume with a changed config ------------------------------------------------------------------------------------

def test_resume_with_another_model_is_refused_naming_both(demo_root, ema_run, tmp_path):
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs", epochs=1)
                         + ["ema.enabled=true", "ema.decay=0.5", f"ckpt_path={ema_run}", "model.name=dinat_mini"],
                         tmp_path / "run")
    with pytest.raises(ValueError, match=r"model\.name: checkpoint 'nat_mini', config 'dinat_mini'"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_resume_with_changed_optimizer_values_names_them_as_overridden(demo_root, ema_run, tmp_path, caplog):
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs", epochs=1)
                         + ["ema.enabled=true", "ema.decay=0.5", f"ckpt_path={ema_run}", "optim.lr=0.5"],
                         tmp_path / "run")
    from natzoo.run.training import check_run_config

    with caplog.at_level(logging.WARNING):
        check_run_config(cfg, "fit")
    assert "overrides optim.lr=0.5 (checkpoint: " in caplog.text


def test_resume_reads_the_checkpoint_once(demo_root, ema_run, tmp_path, monkeypatch):
    from natzoo import checkpoints
    from natzoo.run.training import check_run_config

    calls = []
    real = checkpoints.read_lightning_checkpoint
    monkeypatch.setattr(checkpoints, "read_lightning_checkpoint", lambda *a, **k: calls.append(a) or real(*a, **k))
    checkpoints._READ.clear()
    cfg = compose_config("train", tiny_overrides(demo_root, tmp_path / "logs", epochs=1)
                         + ["ema.enabled=true", "ema.decay=0.5", f"ckpt_path={ema_run}"], tmp_path / "run")
    task, info = check_run_config(cfg, "fit")
    task.build_datamodule(cfg)
    assert len(calls) == 1 and info.hyper_parameters["model_name"] == "nat_mini" and info.global_step == 8


# --- EMA and the model/weights pairing in evaluation -----------------------------------------------------------------

def test_eval_use_ema_with_checkpoint_is_honoured_and_recorded(demo_root, ema_run, tmp_path):
    from natzoo.checkpoints import network_weights

    weights = network_weights(ema_run, use_ema=True)
    assert any(not torch.equal(weights[k], v) for k, v in network_weights(ema_run).items())
    by_file = evaluate(_eval_cfg(demo_root, tmp_path, f"checkpoint={ema_run}", "model=nat_mini", *TINY_MODEL,
                                 "use_ema=true", "output=" + str(tmp_path / "file.json")))
    by_ckpt = evaluate(_eval_cfg(demo_root, tmp_path, f"ckpt_path={ema_run}", "use_ema=true",
                                 "output=" + str(tmp_path / "ckpt.json")))
    plain = evaluate(_eval_cfg(demo_root, tmp_path, f"checkpoint={ema_run}", "model=nat_mini", *TINY_MODEL,
                               "output=" + str(tmp_path / "plain.json")))
    assert by_file["loss"] == pytest.approx(by_ckpt["loss"], abs=1e-6)
    assert by_file["loss"] != pytest.approx(plain["loss"], abs=1e-6)
    recorded = json.loads((tmp_path / "file.json").read_text())["source"]
    assert recorded["use_ema"] is True and recorded["model"] == "nat_mini"
    assert json.loads((tmp_path / "ckpt.json").read_text())["source"]["model"] == "nat_mini"


def test_eval_model_must_match_the_checkpoints_model(demo_root, ema_run, tmp_path):
    cfg = _eval_cfg(demo_root, tmp_path, f"checkpoint={ema_run}", "model=dinat_mini", *TINY_MODEL)
    with pytest.raises(ValueError, match="holds a nat_mini .* but model.name='dinat_mini'"):
        evaluate(cfg)


def test_evaluate_with_command_keeps_the_data_root_of_a_demo_run(demo_root, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from natzoo.run.hydra_setup import register_with_hydra
    from natzoo.testing import CONFIG_DIR
    from natzoo.run.training import _eval_overrides

    register_with_hydra()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.root={demo_root}", "model=nat_mini"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        words = _eval_overrides(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert f"data.root={demo_root}" in words and "model=nat_mini" in words


# --- Data -------------------------------------------------------------------------------------------------------------

@pytest.fixture
def small_copy(demo_root, tmp_path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(demo_root, root)
    return root


def test_symlink_loop_in_a_class_folder_does_not_inflate_the_dataset(small_copy):
    from natzoo.datasets.folder import RobustImageFolder

    classes = sorted(p.name for p in (small_copy / "train").iterdir() if p.is_dir())
    os.symlink("..", small_copy / "train" / classes[0] / "loop")
    os.symlink("../../..", small_copy / "train" / classes[1] / "up")
    os.symlink(small_copy / "val", small_copy / "train" / classes[2] / "val")  # would leak val images into train
    os.symlink(f"../{classes[4]}", small_copy / "train" / classes[3] / "sibling")  # would count them twice
    assert len(RobustImageFolder(small_copy / "train")) == 64


def test_empty_class_folder_is_reported_with_split_and_path_before_the_model(small_copy, tmp_path):
    from natzoo.datasets.folder import check_image_folder_layout

    empty = small_copy / "val" / "zz_empty"
    empty.mkdir()
    (small_copy / "train" / "zz_empty").mkdir()
    (small_copy / "train" / "zz_empty" / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=f"split 'val': class folder {empty} holds no image file"):
        check_image_folder_layout(small_copy, ["train", "val"])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads folders of mode 000")
def test_unreadable_class_folder_is_reported_with_split_and_path(small_copy):
    from natzoo.datasets.folder import check_image_folder_layout

    folder = next((small_copy / "train").iterdir())
    folder.chmod(0)
    try:
        with pytest.raises(ValueError, match=f"split 'train': class folder {folder}"):
            check_image_folder_layout(small_copy, ["train", "val"])
    finally:
        folder.chmod(0o755)


def test_decompression_bomb_follows_the_bad_images_policy(small_copy, monkeypatch):
    from natzoo.datasets.folder import RobustImageFolder

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 32x32 images are over twice the limit
    assert RobustImageFolder(small_copy / "val", bad_images="skip")[0] is None
    with pytest.raises(RuntimeError, match=r"cannot read image file .*\.png: DecompressionBombError"):
        RobustImageFolder(small_copy / "val", bad_images="error")[0]


def _coco(tmp_path: Path, boxes: list) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (20, 10)).save(images / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 1.0, "iscrowd": 0}
                            for i, b in enumerate(boxes)]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return images, path


def test_invalid_boxes_are_counted_and_a_split_without_valid_box_is_refused(tmp_path, caplog):
    from natzoo.datasets.coco import CocoDetectionDataset

    bad = [[0, 0, 0, 5], [-9, -9, 4, 4], [30, 2, 4, 4], [float("nan"), 1, 2, 2]]
    images, annotations = _coco(tmp_path / "a", bad + [[1, 1, 5, 5]])
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetectionDataset(images, annotations, train=True)
    assert dataset.box_counts == {"kept": 1, "not finite": 1, "empty or negative size": 1, "outside the image": 2}
    assert "train split" in caplog.text and "4 of 5 boxes are dropped" in caplog.text
    images, annotations = _coco(tmp_path / "b", bad)
    with pytest.raises(ValueError, match="val split .*no valid box among 4"):
        CocoDetectionDataset(images, annotations, train=False)


# --- Knob bounds, export ----------------------------------------------------------------------------------------------

def test_cpu_threads_has_an_upper_bound_naming_the_key(tmp_path):
    from natzoo.run.training import check_run_config

    with pytest.raises(ValueError, match=r"cpu_threads=100000: expected an integer in \[1, "):
        check_run_config(compose_config("train", ["cpu_threads=100000"], tmp_path), "fit")


def test_export_checks_the_output_path_before_exporting(tmp_path, monkeypatch):
    from natzoo import export

    monkeypatch.setattr(export, "export_program", lambda *a, **k: pytest.fail("exported before checking the path"))
    with pytest.raises(ValueError, match="is a folder"):
        export.export_onnx(torch.nn.Linear(2, 2), tmp_path, input_size=(3, 8, 8))


# --- Console -------------------------------------------------------------------------------------------------------

def test_model_summary_has_no_zero_flops_line(caplog):
    from lightning.pytorch.utilities.model_summary import summarize

    from natzoo.run.callbacks import ModelSummary

    from lightning.pytorch.demos.boring_classes import BoringModel

    model = BoringModel()
    model.example_input_array = None
    summary = summarize(model)
    with caplog.at_level(logging.INFO, logger="natzoo.run.callbacks"):
        ModelSummary.summarize(summary._get_summary_data(), summary.total_parameters, summary.trainable_parameters,
                               summary.model_size, summary.total_training_modes, total_flops=0)
    assert "Total params" in caplog.text and "Total Flops" not in caplog.text


def test_no_top5_curve_with_five_classes_or_fewer(tmp_path):
    from types import SimpleNamespace

    from natzoo.run.callbacks import CurvePlot
    from natzoo.run.tasks import get_task

    metrics = {"val/acc1": torch.tensor(0.5), "val/acc5": torch.tensor(1.0), "val/loss": torch.tensor(1.0)}
    trainer = SimpleNamespace(callback_metrics=metrics, current_epoch=0, sanity_checking=False, is_global_zero=False)
    for classes, expected in ((5, False), (6, True)):
        plot = CurvePlot(str(tmp_path / "curves.png"), get_task("classification").curves)
        plot.on_validation_end(trainer, SimpleNamespace(num_classes=classes))
        plot.on_train_epoch_end(trainer, SimpleNamespace(num_classes=classes))
        assert ("val/acc5" in plot.history[0]) is expected


def test_eval_summary_names_every_file_it_wrote():
    from natzoo.run.evaluation import _summary_line

    line = _summary_line({"top1": 50.0, "output": "/r/eval.json", "confusion_matrix_png": "/r/confusion_matrix.png"})
    assert line.endswith("Results written to /r/eval.json, /r/confusion_matrix.png")


def test_plot_epochs_are_numbered_as_in_metrics_csv_and_the_progress_bar(tmp_path, monkeypatch):
    # Lightning's progress bar and metrics.csv count epochs from 0; the curves did from 1.
    import matplotlib.axes

    from natzoo.plots import plot_curves

    seen = []
    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        seen.append(list(args[0]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    history = [{"epoch": 0, "train/loss": 1.0}, {"epoch": 1, "train/loss": 0.5}]
    plot_curves(history, tmp_path / "curves.png", {"loss": [("train/loss", "train")]})
    assert seen == [[0, 1]]
