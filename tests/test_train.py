"""End-to-end training through the real Hydra configs (composed and shrunk): outputs, resume, DDP, failure rules."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from natzoo import evaluate, train
from natzoo.classification.module import ClassificationModule
from natzoo.datasets import ensure_demo_dataset
from natzoo.testing import compose_config, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    # The parameters tiny_overrides() asks for, so train() finds the dataset complete and reuses it.
    root = tmp_path_factory.mktemp("data") / "demo"
    return ensure_demo_dataset(root, train_per_class=8, val_per_class=4, img_size=32, seed=0)


def _train_cfg(demo_root: Path, tmp_path: Path, *extra: str, name: str = "run", epochs: int = 2):
    overrides = tiny_overrides(demo_root, tmp_path / "logs", epochs=epochs) + list(extra)
    return compose_config("train", overrides, tmp_path / name)


def _read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_train_end_to_end_then_evaluate(demo_root, tmp_path):
    result = train(_train_cfg(demo_root, tmp_path))
    out = Path(result["output_dir"])
    best, last = Path(result["best_checkpoint"]), Path(result["last_checkpoint"])
    assert best == out / "checkpoints" / "best.ckpt" and best.is_file()
    assert last == out / "checkpoints" / "last.ckpt" and last.is_file()
    assert not list((out / "checkpoints").glob(".*tmp")), "atomic save left a temporary file"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _read_metrics(out / "metrics.csv")
    val_acc = [float(r["val/acc1"]) for r in rows if r.get("val/acc1")]
    assert len(val_acc) == 2  # one validation per epoch
    assert result["best_score"] == pytest.approx(max(val_acc))

    # The checkpoint loads without Hydra (plain hyper-parameters) and with weights_only=True.
    module = ClassificationModule.load_from_checkpoint(best, weights_only=True)
    assert module.num_classes == 8 and module.hparams.model_name == "nat_mini"

    eval_cfg = compose_config("eval", [f"ckpt_path={best}", f"data.root={demo_root}", "data.generate.train_per_class=8",
                                       "data.generate.val_per_class=4", "+trainer.enable_progress_bar=false"],
                              tmp_path / "eval")
    res = evaluate(eval_cfg)
    assert Path(res["output"]).is_file() and Path(res["confusion_matrix_png"]).is_file()
    # Evaluating the best checkpoint reproduces the validation accuracy it was selected with.
    assert res["top1"] == pytest.approx(100 * result["best_score"], abs=1e-4)
    matrix = torch.tensor(res["confusion_matrix"])
    assert int(matrix.sum()) == res["num_images"] == 32
    assert 100 * float(matrix.diag().sum()) / 32 == pytest.approx(res["top1"], abs=1e-4)
    assert res["images_per_second"] > 0


def _final_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_resume_after_crash_matches_uninterrupted_run(demo_root, tmp_path):
    # EMA, mixup/cutmix and drop path on, so every source of randomness and every piece of state is exercised.
    extra = ["ema.enabled=true", "ema.decay=0.9", "data.mixup.mixup_alpha=0.8", "data.mixup.cutmix_alpha=1.0",
             "model.drop_path_rate=0.1", "sched.warmup_epochs=1"]
    full = train(_train_cfg(demo_root, tmp_path, *extra, name="full"))

    crash = ["+callbacks.crash._target_=natzoo.testing.CrashAtStep", "+callbacks.crash.step=10"]  # epoch 1, batch 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_train_cfg(demo_root, tmp_path, *extra, *crash, name="crashed"))
    resume_dir = tmp_path / "crashed"
    assert (resume_dir / "checkpoints" / "last.ckpt").is_file()
    # train.py continues in the run directory that wrote the checkpoint (see test_interrupt_...); so does this run.
    resumed = train(_train_cfg(demo_root, tmp_path, *extra, "ckpt_path=last", f"paths.resume_dir={resume_dir}",
                               name="crashed"))
    assert resumed["output_dir"] == str(resume_dir)

    a, b = _final_state(Path(full["last_checkpoint"])), _final_state(Path(resumed["last_checkpoint"]))
    assert (a["global_step"], b["global_step"], a["epoch"], b["epoch"]) == (16, 16, 1, 1), (full, resumed)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("model_ema.") for k in a["state_dict"])
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert full["metrics"]["val/acc1"] == resumed["metrics"]["val/acc1"]
    assert full["metrics"]["val_ema/loss"] == resumed["metrics"]["val_ema/loss"]
    # One metrics.csv holds the whole run, row for row as the uninterrupted run wrote it (no rows lost or repeated),
    # and the curve history in the checkpoint covers every epoch.
    assert _read_metrics(resume_dir / "metrics.csv") == _read_metrics(Path(full["output_dir"]) / "metrics.csv")
    assert [row["epoch"] for row in b["callbacks"]["CurvePlot"]["history"]] == [0, 1]


@pytest.mark.slow
def test_ddp_two_cpu_processes(demo_root, tmp_path):
    # Lightning re-launches `python train.py ...` for rank 1; both ranks use gloo on the CPU.
    run_dir = tmp_path / "ddp"
    args = [sys.executable, "train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.precision=32-true", "trainer.benchmark=false", f"hydra.run.dir={run_dir}"]
    args += tiny_overrides(demo_root, tmp_path / "logs", epochs=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = _final_state(run_dir / "checkpoints" / "last.ckpt")
    # 64 training images, batch 8 per process: the distributed sampler gives each rank 32 images = 4 steps.
    assert ckpt["global_step"] == 4
    assert "Done. Outputs in" in proc.stdout


def test_nonfinite_loss_stops_with_step(demo_root, tmp_path):
    cfg = _train_cfg(demo_root, tmp_path, "optim.lr=1e30", "trainer.gradient_clip_val=null", "sched.epochs=1")
    expected = r"non-finite training loss .* at global step \d+ \(epoch 0, batch \d+\)"
    with pytest.raises(FloatingPointError, match=expected):
        train(cfg)


def test_nonfinite_loss_skip_counts_steps(demo_root, tmp_path):
    cfg = _train_cfg(demo_root, tmp_path, "optim.lr=1e30", "trainer.gradient_clip_val=null", "nonfinite_loss=skip",
                     "sched.epochs=1")
    result = train(cfg)
    assert result["metrics"]["train/skipped_nonfinite"] >= 1
    # The first step made the weights huge (lr 1e30) but finite; every later step was skipped, not applied.
    state = _final_state(Path(result["last_checkpoint"]))["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.fixture
def no_model_build(monkeypatch):
    """Any model construction fails the test: config errors must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(ClassificationModule, "__init__", forbidden)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.name=nat_gigantic", r"model\.name='nat_gigantic' is not a registered timm model"),
        ("data.batch_size=0", r"data\.batch_size=0: expected an integer >= 1"),
        ("data.num_workers=-1", r"data\.num_workers=-1: expected an integer >= 0"),
        ("nonfinite_loss=ignore", r"nonfinite_loss='ignore': expected one of 'stop', 'skip'"),
        ("ckpt_path=/nonexistent/last.ckpt", r"ckpt_path='/nonexistent/last.ckpt' does not exist"),
        ("checkpoint=/nonexistent/w.pth", r"checkpoint='/nonexistent/w.pth' does not exist"),
        ("task=segmentation", r"task='segmentation' is not a known task; choose one of \['classification', "),
        ("ckpt_path=last", r"ckpt_path=last: no checkpoints/last.ckpt under"),
    ],
)
def test_bad_config_fails_fast(demo_root, tmp_path, no_model_build, override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        train(_train_cfg(demo_root, tmp_path, override))


def test_missing_dataset_and_wrong_layout_fail_fast(tmp_path, no_model_build):
    base = ["data=folder", "logger=csv", "callbacks=none", f"paths.log_dir={tmp_path / 'logs'}"]
    missing = compose_config("train", base + [f"data.root={tmp_path / 'nope'}"], tmp_path / "a")
    with pytest.raises(ValueError, match=r"data\.root=.*nope' does not exist"):
        train(missing)
    unset = compose_config("train", base, tmp_path / "b")
    with pytest.raises(ValueError, match=r"data\.root is not set"):
        train(unset)
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "val").mkdir()
    (flat / "train" / "img0.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"has no class sub-directories; expected the ImageNet layout"):
        train(compose_config("train", base + [f"data.root={flat}"], tmp_path / "c"))
    (flat / "train" / "cat").mkdir()
    (flat / "val" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"val has different classes than .*train: extra \['dog'\], missing \['cat'\]"):
        train(compose_config("train", base + [f"data.root={flat}"], tmp_path / "d"))
    nosplit = tmp_path / "nosplit"
    (nosplit / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"has no 'train' directory .* expected the ImageNet layout"):
        train(compose_config("train", base + [f"data.root={nosplit}"], tmp_path / "e"))


def _copy_with_corrupt_image(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    bad = dst / "train" / "circle" / "00000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return bad


def test_corrupt_image_error_names_file(demo_root, tmp_path):
    bad = _copy_with_corrupt_image(demo_root, tmp_path / "corrupt")
    cfg = _train_cfg(tmp_path / "corrupt", tmp_path, "data.generate=null", "sched.epochs=1")
    with pytest.raises(RuntimeError, match=re.escape(f"cannot read image file {bad}")):
        train(cfg)


def test_corrupt_image_skipped_and_counted(demo_root, tmp_path):
    _copy_with_corrupt_image(demo_root, tmp_path / "corrupt")
    cfg = _train_cfg(tmp_path / "corrupt", tmp_path, "data.generate=null", "data.bad_images=skip", "sched.epochs=1")
    result = train(cfg)
    assert result["metrics"]["train/skipped_images"] == 1.0


def test_finetune_from_weights_file_with_new_head_and_frozen_layers(demo_root, tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("nat_mini", num_classes=10, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                               kernel_size=3)
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / "pretrained_10_classes.pth"
    torch.save(weights, path)

    cfg = _train_cfg(demo_root, tmp_path, f"checkpoint={path}", "model.freeze=[patch_embed,levels.0]",
                     "sched.epochs=1", "optim.weight_decay=0.5")
    result = train(cfg)
    state = _final_state(Path(result["last_checkpoint"]))["state_dict"]
    assert state["model.head.weight"].shape == (8, 128)  # a new 8-class head replaced the 10-class one
    for key, value in weights.items():
        if key.startswith(("patch_embed.", "levels.0.")):
            assert torch.equal(state[f"model.{key}"], value), key  # frozen: untouched, even by weight decay
    changed = [k for k in weights if k.startswith("levels.1.") and not torch.equal(state[f"model.{k}"], weights[k])]
    assert changed, "the unfrozen layers were loaded but never trained"
    # Unfrozen layers started from the file: one epoch of small steps keeps them close to it.
    qkv = "levels.3.blocks.0.attn.qkv.weight"
    assert torch.allclose(state[f"model.{qkv}"], weights[qkv], atol=0.05)


@pytest.mark.slow
def test_compile_runs_the_model_through_torch_compile(demo_root, tmp_path):
    # A backend that records every graph dynamo captures and runs it as captured: training must go through the
    # compiled model (graphs recorded) and give the eager run's weights.
    from torch._dynamo import register_backend, reset

    graphs = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    reset()
    register_backend(recording, name="natzoo_test_recording")
    short = ("sched.epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1")
    eager = train(_train_cfg(demo_root, tmp_path, *short, name="eager"))
    assert not graphs
    compiled = train(_train_cfg(demo_root, tmp_path, *short, "compile={backend:natzoo_test_recording}",
                                name="compiled"))
    reset()
    assert graphs, "compile=... did not route the model through torch.compile"
    a, b = _final_state(Path(eager["last_checkpoint"])), _final_state(Path(compiled["last_checkpoint"]))
    assert a["state_dict"].keys() == b["state_dict"].keys()  # the plain model's keys, no compile wrapper prefix
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_multirun_sweep_runs_every_job_in_its_own_directory(demo_root, tmp_path):
    # `python train.py -m a=1,2`: one job per value, each in <sweep dir>/<job number>, each trained with its value.
    sweep_dir = tmp_path / "sweep"
    args = [sys.executable, "train.py", "-m", "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep_dir}",
            "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    args += tiny_overrides(demo_root, tmp_path / "logs", epochs=1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for job, lr in ((0, 1e-3), (1, 3e-3)):
        ckpt = _final_state(sweep_dir / str(job) / "checkpoints" / "last.ckpt")
        assert ckpt["hyper_parameters"]["optim"]["lr"] == lr and ckpt["global_step"] == 2
        assert (sweep_dir / str(job) / "metrics.csv").is_file()


def _assert_quiet_console(output: str) -> None:
    """Each message once (Lightning's INFO lines were printed twice under Hydra), no advertisement, no dependency
    deprecation warning, no warning about files that are not deleted or directories that are meant to be reused."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), "\n".join(lines)
    assert sum("GPU available" in line for line in lines) == 1
    for noise in ("💡", "Tip:", "LeafSpec", "deprecated", "will be deleted", "exists and is not empty"):
        assert noise not in output, output


@pytest.mark.slow
def test_interrupt_prints_resume_command_that_continues_in_the_same_run_directory(demo_root, tmp_path):
    # Ctrl-C mid-epoch (simulated): the printed command, pasted into a shell, resumes the run in its own directory;
    # paths with spaces survive both printed commands (resume and evaluate).
    logs = tmp_path / "my logs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "train.py", *tiny_overrides(demo_root, logs, epochs=2)]
    stop = ["+callbacks.stop._target_=natzoo.testing.InterruptAtStep", "+callbacks.stop.step=10"]  # epoch 1
    first = subprocess.run(base + stop, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    _assert_quiet_console(first.stdout + first.stderr)
    runs = list((logs / "demo-nat_mini" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    hint = first.stdout.split("Interrupted. Resume from ", 1)[1]
    assert hint.startswith(str(run / "checkpoints" / "last.ckpt"))
    command = hint.splitlines()[1].strip()
    assert command.startswith("python train.py ") and "ckpt_path=" in command
    for word in stop:  # resume without the simulated Ctrl-C
        assert f" {word}" in command
        command = command.replace(f" {word}", "")
    command = command.replace("python", shlex.quote(sys.executable), 1)
    second = subprocess.run(command, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert second.returncode == 0, command + "\n" + second.stdout[-3000:] + second.stderr[-3000:]
    _assert_quiet_console(second.stdout + second.stderr)
    assert list((logs / "demo-nat_mini" / "runs").iterdir()) == [run]  # no second run directory
    assert _final_state(run / "checkpoints" / "last.ckpt")["global_step"] == 16
    rows = _read_metrics(run / "metrics.csv")  # one metrics.csv for the whole run, nothing logged twice
    assert [int(r["epoch"]) for r in rows if r.get("val/acc1")] == [0, 1]
    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert steps == sorted(set(steps))
    assert "ckpt_path: null" in (run / ".hydra" / "config.yaml").read_text()  # the first part's record is kept
    assert len(list((run / ".hydra").glob("resumed_*/config.yaml"))) == 1

    evaluate_with = second.stdout.split("Evaluate with: ", 1)[1].splitlines()[0]
    evaluate_with = evaluate_with.replace("python", shlex.quote(sys.executable), 1)
    evaluate_with += f" hydra.run.dir={shlex.quote(str(tmp_path / 'eval'))} +trainer.enable_progress_bar=false"
    evaluated = subprocess.run(evaluate_with + f" data.root={demo_root}", shell=True, cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300, check=False)
    assert evaluated.returncode == 0, evaluate_with + "\n" + evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["source"]["ckpt_path"].startswith(str(run))


def test_cpu_threads_apply_while_computing_on_the_cpu_and_are_restored(tmp_path):
    from natzoo.run.training import cpu_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with cpu_threads(compose_config("train", ["cpu_threads=1"], tmp_path)):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with cpu_threads(compose_config("train", ["cpu_threads=null"], tmp_path)):
            assert torch.get_num_threads() == 2  # PyTorch's default kept
        with cpu_threads(compose_config("train", ["cpu_threads=1", "trainer=gpu"], tmp_path)):
            assert torch.get_num_threads() == 2  # not a CPU run
    finally:
        torch.set_num_threads(before)
