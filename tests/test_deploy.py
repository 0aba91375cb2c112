"""From a trained run to a deployed model: checkpoints that record their model, preprocessing and class names,
``natzoo-export`` (ONNX, torch.export, timm folder) and ``natzoo-predict`` (checkpoint, timm folder, ONNX), and their
refusals of bad inputs."""

from __future__ import annotations

import inspect
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image

from natzoo import train
from natzoo.tools.averaging import average_checkpoints
from natzoo.datasets import ensure_demo_dataset
from natzoo.testing import compose_config, tiny_overrides
from natzoo.tools import export_cli, predict
from natzoo.tools.model_info import info_from_checkpoint

from helpers import one_thread  # noqa: F401

TINY = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "kernel_size": 3}


def _exit_message(capsys, command, argv) -> str:
    """Runs a command's main(argv), which must exit with status 2; returns its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        command(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch `debug=tiny` run of the demo (as the other training tests): its run result and data root."""
    base = tmp_path_factory.mktemp("deploy")
    root = ensure_demo_dataset(base / "demo", train_per_class=8, val_per_class=4, img_size=32, seed=0)
    cfg = compose_config("train", tiny_overrides(root, base / "logs", epochs=1), base / "run")
    result = train(cfg)
    # What Hydra writes into a run directory (train() is called here without @hydra.main): the composed config.
    (base / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, base / "run" / ".hydra" / "config.yaml")
    return result, root, base


def _predictions(path: Path) -> dict[str, list]:
    document = json.loads(path.read_text())
    return {p["path"]: p["top"] for p in document["predictions"]}


@pytest.mark.slow
def test_checkpoints_record_the_runs_preprocessing_and_class_names(trained, tmp_path):
    result, root, _ = trained
    classes = sorted(p.name for p in (root / "train").iterdir())
    for path in (result["best_checkpoint"], result["last_checkpoint"]):
        record = torch.load(path, map_location="cpu", weights_only=True)["natzoo_model"]
        assert record["model_name"] == "nat_mini" and record["num_classes"] == 8
        assert record["model_kwargs"] == TINY
        assert record["label_names"] == classes
        # configs/data/demo.yaml + debug=tiny: 32 px, crop_pct 1.0, nat_mini's bicubic and ImageNet mean/std
        assert record["data_config"] == {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 1.0,
                                         "crop_mode": "center", "mean": [0.485, 0.456, 0.406],
                                         "std": [0.229, 0.224, 0.225]}
    averaged = average_checkpoints([result["best_checkpoint"], result["last_checkpoint"]], tmp_path / "avg.ckpt")
    best = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)
    assert torch.load(averaged, map_location="cpu", weights_only=True)["natzoo_model"] == best["natzoo_model"]
    # The same checkpoint without its record (as older natzoo wrote it), still in its run directory: the run's
    # .hydra/config.yaml gives the same preprocessing, with a note.
    best.pop("natzoo_model")
    stripped = Path(result["best_checkpoint"]).with_name("stripped.ckpt")
    torch.save(best, stripped)
    info = info_from_checkpoint(torch.load(stripped, map_location="cpu", weights_only=True), str(stripped))
    assert info.data_config == {**record["data_config"], "input_size": (3, 32, 32),
                                "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    assert "preprocessing of" in info.assumed and ".hydra/config.yaml" in info.assumed and info.label_names is None


@pytest.mark.slow
def test_export_then_predict_gives_the_checkpoints_top5(trained, capsys):
    result, root, base = trained
    best = result["best_checkpoint"]
    onnx_path, folder = base / "model.onnx", base / "timm_folder"
    export_cli.main([best, "-o", str(onnx_path)])
    out = capsys.readouterr().out
    assert f"wrote {onnx_path} (onnx, input 32x32)" in out
    difference = float(out.split("max |difference| ")[1].split()[0])
    assert difference < 1e-4

    outputs = {}
    for name, model in (("ckpt", best), ("onnx", onnx_path)):
        outputs[name] = base / f"{name}.json"
        predict.main(["-m", str(model), str(root / "val"), "-o", str(outputs[name]), "-q"])
    capsys.readouterr()
    from_ckpt, from_onnx = _predictions(outputs["ckpt"]), _predictions(outputs["onnx"])
    assert len(from_ckpt) == 32 and from_ckpt.keys() == from_onnx.keys()
    for path, top in from_ckpt.items():
        assert len(top) == 5
        assert [t["label"] for t in from_onnx[path]] == [t["label"] for t in top], path
        np.testing.assert_allclose([t["probability"] for t in from_onnx[path]], [t["probability"] for t in top],
                                   atol=1e-5)
    # The run's own preprocessing: top-1 over the validation folder is the accuracy the run selected best.ckpt by.
    correct = sum(top[0]["label"] == Path(path).parent.name for path, top in from_ckpt.items())
    assert 100 * correct / 32 == pytest.approx(100 * result["best_score"], abs=1e-4)

    # A timm folder of the trained model: labelled as natzoo's, not as the official in1k weights; same predictions.
    export_cli.main([best, "-o", str(folder)])
    config = json.loads((folder / "config.json").read_text())
    assert config["pretrained_cfg"]["tag"] == "natzoo" and "in1k" not in json.dumps(config["pretrained_cfg"])
    assert "SHI-Labs/Neighborhood" not in json.dumps(config) and best in config["pretrained_cfg"]["notes"][0]
    assert config["label_names"] == sorted(p.name for p in (root / "val").iterdir())
    results, _ = predict.predict(str(folder), [str(root / "val")], report=lambda line: None)
    assert {r.path: [t[1] for t in r.top] for r in results} == {p: [t["label"] for t in top]
                                                                 for p, top in from_ckpt.items()}


@pytest.mark.slow
def test_export_to_a_torch_export_program(trained, capsys):
    result, _, base = trained
    path = base / "model.pt2"
    export_cli.main([result["best_checkpoint"], "-o", str(path)])
    assert f"wrote {path} (program" in capsys.readouterr().out
    extra = {"natzoo_model.json": ""}
    program = torch.export.load(path, extra_files=extra)
    assert json.loads(extra["natzoo_model.json"])["data_config"]["input_size"] == [3, 32, 32]
    model = timm.create_model("nat_mini", num_classes=8, **TINY)
    state = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model.eval()(x), rtol=0, atol=1e-4)


# ---- bad inputs (no training: a hand-made checkpoint of a tiny model) ----

@pytest.fixture
def files(tmp_path):
    """A Lightning checkpoint (with and without its record), good, undecodable and truncated images."""
    model = timm.create_model("nat_mini", num_classes=3, **TINY)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    base = {"state_dict": state, "pytorch-lightning_version": "2.6.6", "epoch": 0, "global_step": 1,
            "hyper_parameters": {"model_name": "nat_mini", "num_classes": 3, "model_kwargs": TINY}}
    record = {"format": 1, "model_name": "nat_mini", "num_classes": 3, "model_kwargs": TINY,
              "label_names": ["cat", "dog", "owl"],
              "data_config": {"input_size": [3, 32, 32], "interpolation": "bilinear", "crop_pct": 1.0,
                              "crop_mode": "center", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    torch.save({**base, "natzoo_model": record}, tmp_path / "run.ckpt")
    torch.save(base, tmp_path / "old.ckpt")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(images / f"good{i}.png")
    (images / "bad.png").write_bytes(b"not an image at all")
    png = (images / "good0.png").read_bytes()
    truncated = tmp_path / "truncated" / "cut.png"
    truncated.parent.mkdir()
    truncated.write_bytes(png[: len(png) // 2])
    return tmp_path


def test_predict_names_unreadable_images_and_skips_them_only_when_asked(files, capsys):
    ckpt, images = files / "run.ckpt", files / "images"
    err = _exit_message(capsys, predict.main, ["-m", str(ckpt), str(images)])
    assert f"cannot read image {images / 'bad.png'}" in err and "--skip-bad" in err
    cut = files / "truncated" / "cut.png"  # the header reads; decoding fails
    err = _exit_message(capsys, predict.main, ["-m", str(ckpt), str(images / "good0.png"), str(cut)])
    assert f"cannot read image {cut}" in err
    out = files / "p.csv"
    predict.main(["-m", str(ckpt), str(images), str(cut), "--skip-bad", "-o", str(out), "-k", "2"])
    captured = capsys.readouterr()
    assert "skipped 2 unreadable image(s)" in captured.err and f"{images / 'bad.png'}: skipped" in captured.out
    rows = out.read_text().splitlines()
    assert rows[0] == "path,label_1,probability_1,index_1,label_2,probability_2,index_2,error"
    assert len(rows) == 6 and sum(",,,,,," in r for r in rows) == 2  # skipped rows: no label, the reason
    assert all(r.split(",")[1] in ("cat", "dog", "owl") for r in rows[1:] if ",,,,,," not in r)


def test_bad_model_sources_are_named_before_any_work(files, capsys):
    images = str(files / "images" / "good0.png")
    (files / "corrupt.ckpt").write_bytes(b"\x00garbage" * 20)
    (files / "weights.pth").write_bytes(b"x")
    (files / "notes.txt").write_text("x")
    cases = {
        str(files / "missing.ckpt"): "does not exist",
        str(files / "corrupt.ckpt"): "cannot be read as a PyTorch checkpoint",
        str(files / "weights.pth"): "is a weights file",
        str(files / "notes.txt"): "unknown file kind '.txt'",
        str(files / "images"): "is a folder without config.json",
        "nat_minii": "neither an existing file or folder nor a registered model",
        "nat_mini": "pass --pretrained",
    }
    for source, message in cases.items():
        assert message in _exit_message(capsys, predict.main, ["-m", source, images]), source
        assert message in _exit_message(capsys, export_cli.main, [source, "-o", str(files / "m.onnx")]), source
    assert "image 'nope.png' does not exist" in _exit_message(capsys, predict.main, ["-m", str(files / "run.ckpt"),
                                                                                   "nope.png"])
    (files / "taken.json").write_text("{}")
    assert "exists; it is not replaced" in _exit_message(
        capsys, predict.main, ["-m", str(files / "run.ckpt"), images, "-o", str(files / "taken.json")])
    assert (files / "taken.json").read_text() == "{}"


def test_export_never_replaces_what_it_did_not_write(files, capsys):
    ckpt = str(files / "run.ckpt")
    foreign = files / "foreign.onnx"
    foreign.write_bytes(b"someone else's model")
    assert "exists; choose another path, or pass --overwrite" in _exit_message(
        capsys, export_cli.main, [ckpt, "-o", str(foreign)])
    assert "was not written by natzoo-export" in _exit_message(
        capsys, export_cli.main, [ckpt, "-o", str(foreign), "--overwrite"])
    assert foreign.read_bytes() == b"someone else's model"
    folder = files / "timm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    assert "was not written by natzoo-export" in _exit_message(
        capsys, export_cli.main, [ckpt, "-o", str(folder), "--overwrite"])
    assert (folder / "config.json").read_text() == "{}"
    # Its own timm folder is replaced with --overwrite (and only then).
    mine = files / "mine"
    export_cli.main([ckpt, "-o", str(mine)])
    # Labelled as the model natzoo trained from the checkpoint, not as the official in1k weights of nat_mini.
    config = json.loads((mine / "config.json").read_text())
    assert config["pretrained_cfg"]["tag"] == "natzoo" and ckpt in config["pretrained_cfg"]["notes"][0]
    assert "SHI-Labs" not in json.dumps(config["pretrained_cfg"]).replace("not the official SHI-Labs", "")
    assert "exists" in _exit_message(capsys, export_cli.main, [ckpt, "-o", str(mine)])
    export_cli.main([ckpt, "-o", str(mine), "--overwrite"])
    assert f"wrote {mine}" in capsys.readouterr().out


def test_dynamic_is_passed_on_or_refused_by_name(files, capsys):
    from natzoo.tools import export

    if "dynamic" in inspect.signature(export.export_onnx).parameters:
        pytest.skip("natzoo.tools.export.export_onnx takes dynamic=: tested with the dynamic export")
    err = _exit_message(capsys, export_cli.main, [str(files / "run.ckpt"), "-o", str(files / "d.onnx"), "--dynamic"])
    assert "--dynamic: natzoo.tools.export.export_onnx has no dynamic= option" in err
    assert not (files / "d.onnx").exists()


def test_a_checkpoint_without_a_record_works_with_one_note(files, capsys):
    results, info = predict.predict(str(files / "old.ckpt"), [str(files / "images" / "good1.png")],
                                    report=print)
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "written before natzoo recorded preprocessing and class names" in out
    assert "224x224" in out  # nat_mini's pretrained input size
    assert info.input_size == (3, 224, 224) and [t[1] for t in results[0].top] and results[0].top[0][1] in "012"
    # Still in its run directory: the run's .hydra/config.yaml gives its preprocessing (unset values: nat_mini's).
    run = files / "run_dir"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("paths:\n  data_dir: ${hydra:runtime.cwd}/data\ndata:\n  img_size: 48\n"
                                                "  root: ${paths.data_dir}/x\n  mean: null\n  eval_transform:\n"
                                                "    crop_pct: 1.0\n    interpolation: bilinear\n")
    (run / "checkpoints").mkdir()
    moved = (files / "old.ckpt").rename(run / "checkpoints" / "old.ckpt")
    results, info = predict.predict(str(moved), [str(files / "images" / "good1.png")], report=print)
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and f"the preprocessing of {run / '.hydra' / 'config.yaml'} (48x48 px" in out
    assert info.data_config == {"input_size": (3, 48, 48), "interpolation": "bilinear", "crop_pct": 1.0,
                                "crop_mode": "center", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    # The recorded one: no note, its own 32-px preprocessing and class names.
    results, info = predict.predict(str(files / "run.ckpt"), [str(files / "images" / "good1.png")], report=print)
    assert capsys.readouterr().out == "" and info.input_size == (3, 32, 32)
    assert {t[1] for t in results[0].top} == {"cat", "dog", "owl"}


def test_python_m_natzoo_export_without_arguments_prints_its_usage(monkeypatch, capsys):
    # It used to print nothing and exit 0 (no __main__ block). runpy runs the module as `python -m` does, in-process.
    monkeypatch.setattr(sys, "argv", ["natzoo/tools/export.py"])
    monkeypatch.delitem(sys.modules, "natzoo.tools.export", raising=False)  # runpy runs a fresh copy as __main__
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("natzoo.tools.export", run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: natzoo-export" in err and "--output" in err
