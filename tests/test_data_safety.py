"""The generated demo datasets never touch a folder natzoo did not write, and leftovers of killed runs are cleaned up.

Crashes are real: a forked child process kills itself with SIGKILL in the middle of a generation or a replacement,
and the next call in this process must remove exactly what the child left (scratch entries of a dead process on this
host whose contents are all files the generator writes) and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
from pathlib import Path

import pytest

from natzoo import train
from natzoo.classification.module import ClassificationModule
from natzoo.datasets import coco_shapes, demo, ensure_demo_dataset, generate_demo_dataset
from natzoo.datasets.coco_shapes import SyntheticCocoSpec, make_synthetic_coco
from natzoo.ownership import GeneratedFolder, scratch_prefix
from natzoo.testing import compose_config, tiny_overrides

SMALL = {"train_per_class": 2, "val_per_class": 1, "img_size": 16}
SPEC = SyntheticCocoSpec(num_train=4, num_val=2, image_size=32, min_shape_size=8, max_shape_size=12, seed=1)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (folders too) with a hash of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _scratch(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".natzoo-" in p.name)


def _killed_child(action) -> int:
    """Runs ``action()`` in a forked child that must kill itself with SIGKILL; returns the child's (now dead) pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        try:
            action()
        finally:
            os._exit(3)  # reached only if the action did not kill the process
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the child was supposed to be killed"
    return pid


def _kill_after(calls: int, real):
    """A stand-in for ``real`` that kills the process with SIGKILL on its ``calls``-th call."""
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return wrapper


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# --- the classification demo --------------------------------------------------------------------------------------

def _user_folder_foreign_manifest(root: Path) -> None:
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "cat" / "tom.jpg").write_bytes(b"\xff\xd8 my cat")
    (root / "MANIFEST.json").write_text(json.dumps({"project": "cats", "format_version": 2}))


def _user_folder_binary_manifest(root: Path) -> None:
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "thesis.tex").write_text("\\section{Results}")
    (root / "MANIFEST.json").write_bytes(b"\x00\x01 not json")


def _demo_with_user_file(root: Path) -> None:
    generate_demo_dataset(root, **dict(SMALL, train_per_class=3))
    (root / "train" / "circle" / "my_drawing.png").write_bytes(b"\x89PNG mine")


def _demo_with_changed_image(root: Path) -> None:
    generate_demo_dataset(root, **dict(SMALL, train_per_class=3))
    (root / "val" / "ring" / "00000.png").write_bytes(b"\x89PNG overwritten by the user")


def _legacy_manifest_over_user_files(root: Path) -> None:
    generate_demo_dataset(root, **dict(SMALL, train_per_class=3))
    manifest = json.loads((root / "MANIFEST.json").read_text())
    legacy = {k: manifest[k] for k in ("format_version", "classes", "train_per_class", "val_per_class", "img_size",
                                       "seed", "counts")}
    (root / "MANIFEST.json").write_text(json.dumps(legacy))
    (root / "val" / "extra").mkdir()
    (root / "val" / "extra" / "x.png").write_bytes(b"mine")


@pytest.mark.parametrize(
    "make, message",
    [
        (_user_folder_foreign_manifest, r"MANIFEST.json that natzoo's demo generator did not write.*data=folder"),
        (_user_folder_binary_manifest, r"MANIFEST.json that cannot be read as JSON.*data=folder"),
        (_demo_with_user_file, r"also files the generator did not write or that changed since \(train/circle/my_dr"),
        (_demo_with_changed_image, r"also files the generator did not write or that changed since \(val/ring/00000"),
        (_legacy_manifest_over_user_files, r"MANIFEST.json that natzoo's demo generator did not write"),
    ],
)
def test_demo_never_replaces_a_folder_it_cannot_prove_it_wrote(tmp_path, make, message):
    root = tmp_path / "mine"
    make(root)
    before = _snapshot(root)
    with pytest.raises(ValueError, match=f"data.root='{re.escape(str(root))}' .*{message}"):
        ensure_demo_dataset(root, **SMALL)
    assert _snapshot(root) == before
    assert _scratch(tmp_path) == []


@pytest.fixture
def no_model_build(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the data root was checked")

    monkeypatch.setattr(ClassificationModule, "__init__", forbidden)


def test_train_with_the_demo_config_refuses_a_users_folder(tmp_path, no_model_build):
    # `python train.py data.root=<dir>` with the default data=demo: the user's folder is reported, not replaced.
    root = tmp_path / "my_dataset"
    _user_folder_foreign_manifest(root)
    (root / "val" / "cat").mkdir(parents=True)
    (root / "val" / "cat" / "felix.jpg").write_bytes(b"\xff\xd8 another cat")
    before = _snapshot(root)
    cfg = compose_config("train", tiny_overrides(root, tmp_path / "logs"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"not a demo dataset natzoo generated.*use data=folder"):
        train(cfg)
    assert _snapshot(root) == before


def test_demo_replaces_only_its_own_outdated_dataset(tmp_path):
    root = tmp_path / "demo"
    root.mkdir()  # an empty folder is filled
    ensure_demo_dataset(root, **SMALL)
    (root / "val" / "dots" / "00000.png").unlink()  # a file gone: regenerated, not reused as it is
    ensure_demo_dataset(root, **SMALL)
    assert (root / "val" / "dots" / "00000.png").is_file()
    ensure_demo_dataset(root, **dict(SMALL, train_per_class=3))  # other parameters: regenerated
    assert len(list((root / "train" / "circle").iterdir())) == 3
    assert _scratch(tmp_path) == []


def test_demo_leaves_a_dataset_of_the_older_manifest_format_alone(tmp_path):
    # Manifests without a file list (natzoo before the file-listing format) prove nothing about the folder's files.
    root = tmp_path / "demo"
    generate_demo_dataset(root, **SMALL)
    manifest = json.loads((root / "MANIFEST.json").read_text())
    legacy = {k: manifest[k] for k in ("format_version", "classes", "train_per_class", "val_per_class", "img_size",
                                       "seed", "counts")}
    (root / "MANIFEST.json").write_text(json.dumps(legacy))
    before = _snapshot(root)
    for params in (SMALL, dict(SMALL, seed=1)):
        with pytest.raises(ValueError, match=r"did not write.*data=folder"):
            ensure_demo_dataset(root, **params)
        assert _snapshot(root) == before


def test_demo_generation_says_what_it_creates_and_where(tmp_path, caplog):
    root = tmp_path / "typo" / "demo_dataset"
    with caplog.at_level(logging.INFO, logger="natzoo.datasets.demo"):
        ensure_demo_dataset(root, **SMALL)
        ensure_demo_dataset(root, **SMALL)
    lines = [r.getMessage() for r in caplog.records if r.name == "natzoo.datasets.demo"]
    assert len(lines) == 1, lines  # once: the second call reuses the dataset silently
    assert f"16 training + 8 validation PNG images of 16 px) in {root}" in lines[0]


def test_demo_refuses_a_file_as_root(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("keep me")
    with pytest.raises(ValueError, match=r"data.root='.*data.txt' is a file"):
        ensure_demo_dataset(path, **SMALL)
    assert path.read_text() == "keep me"


def test_killed_demo_generation_is_cleaned_up_by_the_next_run(tmp_path):
    root = tmp_path / "demo"
    _killed_child(lambda: (setattr(demo, "_draw_sample", _kill_after(5, demo._draw_sample)),
                           ensure_demo_dataset(root, **SMALL)))
    # It leaves its scratch folder and the lock it held (GeneratedFolder.exclusive); the next run removes both.
    left = _scratch(tmp_path)
    assert not root.exists() and len(left) == 2 and left[0] == ".demo.natzoo-lock" and "natzoo-partial" in left[1]
    ensure_demo_dataset(root, **SMALL)
    assert _scratch(tmp_path) == [] and len(list((root / "train" / "circle").iterdir())) == 2


def test_killed_demo_replacement_is_cleaned_up_by_the_next_run(tmp_path):
    root = tmp_path / "demo"
    ensure_demo_dataset(root, **SMALL)
    # Killed while deleting the outdated dataset, after it was moved aside: half of its files are gone.
    _killed_child(lambda: (setattr(demo.os, "remove", _kill_after(10, os.remove)),
                           ensure_demo_dataset(root, **dict(SMALL, seed=3))))
    # It leaves its scratch folder and the lock it held (GeneratedFolder.exclusive); the next run removes both.
    left = _scratch(tmp_path)
    assert not root.exists() and len(left) == 2 and left[0] == ".demo.natzoo-lock" and "natzoo-stale" in left[1]
    ensure_demo_dataset(root, **dict(SMALL, seed=3))
    assert _scratch(tmp_path) == [] and json.loads((root / "MANIFEST.json").read_text())["seed"] == 3


def test_demo_keeps_leftovers_it_cannot_prove_abandoned_and_its_own(tmp_path):
    prefix = scratch_prefix("demo", "partial")  # this (running) process: a concurrent generation, not a leftover
    running = tmp_path / (prefix + "abcd1234")
    (running / "train" / "circle").mkdir(parents=True)
    dead = prefix.replace(f".{os.getpid()}.", f".{_dead_pid()}.")
    with_foreign = tmp_path / (dead + "efgh5678")  # a dead process's name, but a file the generator never writes
    (with_foreign / "train").mkdir(parents=True)
    (with_foreign / "train" / "notes.txt").write_text("mine")
    other_host = tmp_path / f".demo.natzoo-partial.some-other-host.{_dead_pid()}.ijkl9012"
    other_host.mkdir()
    lookalike = tmp_path / ".demo.partial-xyz"  # the scratch name of older natzoo versions: no owner recorded
    lookalike.mkdir()
    ensure_demo_dataset(tmp_path / "demo", **SMALL)
    assert running.is_dir() and (with_foreign / "train" / "notes.txt").is_file()
    assert other_host.is_dir() and lookalike.is_dir()


# --- the detection demo -------------------------------------------------------------------------------------------

def _target(cache: Path) -> Path:
    return cache / f"coco_shapes_{SPEC.fingerprint()}"


def _user_files_at_target(target: Path) -> None:
    (target / "train").mkdir(parents=True)
    (target / "train" / "000001.png").write_bytes(b"my own image")


def _foreign_done_file(target: Path) -> None:
    target.mkdir(parents=True)
    (target / "generation.json").write_text(json.dumps({"experiment": 7}))
    (target / "results.csv").write_text("a,b\n1,2\n")


def _generated_then_changed(target: Path) -> None:
    make_synthetic_coco(SPEC, target.parent)
    (target / "annotations" / "instances_val.json").write_text("{}")


@pytest.mark.parametrize("make", [_user_files_at_target, _foreign_done_file, _generated_then_changed])
def test_synthetic_coco_never_touches_a_folder_it_cannot_prove_it_wrote(tmp_path, make):
    target = _target(tmp_path)
    make(target)
    before = _snapshot(target)
    message = f"{re.escape(str(target))} exists but is not a complete shapes dataset natzoo generated"
    with pytest.raises(ValueError, match=message):
        make_synthetic_coco(SPEC, tmp_path)
    assert _snapshot(target) == before
    assert _scratch(tmp_path) == []


def test_synthetic_coco_generation_says_what_it_creates_and_where(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="natzoo.datasets.coco_shapes"):
        make_synthetic_coco(SPEC, tmp_path / "cache")
        make_synthetic_coco(SPEC, tmp_path / "cache")
    lines = [r.getMessage() for r in caplog.records if r.name == "natzoo.datasets.coco_shapes"]
    assert len(lines) == 1, lines
    assert f"(4 training + 2 validation images of 32 px, COCO format) in {_target(tmp_path / 'cache')}" in lines[0]


def test_killed_synthetic_coco_generation_is_cleaned_up_by_the_next_run(tmp_path):
    def run() -> None:
        coco_shapes._generate_split = _kill_after(2, coco_shapes._generate_split)  # killed before the val split
        make_synthetic_coco(SPEC, tmp_path)

    _killed_child(run)
    # It leaves its scratch folder and the lock it held (GeneratedFolder.exclusive); the next run removes both.
    left = _scratch(tmp_path)
    assert not _target(tmp_path).exists() and len(left) == 2 and left[0] == f".{_target(tmp_path).name}.natzoo-lock"
    running = tmp_path / (scratch_prefix(_target(tmp_path).name, "partial") + "abcd1234")
    running.mkdir()
    make_synthetic_coco(SPEC, tmp_path)
    assert _scratch(tmp_path) == [running.name]  # the killed run's folder is gone; a running process's is kept
    assert (_target(tmp_path) / "annotations" / "instances_val.json").is_file()


def _record_folder() -> GeneratedFolder:
    return GeneratedFolder("tests.generator", "RECORD.json", lambda rel: rel in ("a.txt", "RECORD.json"))


@pytest.mark.parametrize("theirs, ours_used", [({"v": 1}, True), ({"v": 2}, False)])
def test_generated_folder_uses_a_concurrent_copy_only_when_it_is_the_wanted_one(tmp_path, theirs, ours_used):
    folder, root = _record_folder(), tmp_path / "data"

    def fill(out: Path) -> None:
        (out / "a.txt").write_text("x")

    def fill_while_another_process_finishes(out: Path) -> None:
        fill(out)
        folder.generate(root, theirs, fill)

    if ours_used:
        assert folder.generate(root, {"v": 1}, fill_while_another_process_finishes) == root
    else:
        with pytest.raises(OSError):
            folder.generate(root, {"v": 1}, fill_while_another_process_finishes)
    assert json.loads((root / "RECORD.json").read_text()) == {"generator": "tests.generator", **theirs,
                                                               "files": {"a.txt": 1}}
    assert folder.is_complete(root, {"v": 1}) is ours_used
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no scratch folder left behind


def test_generated_folder_removes_only_a_folder_holding_nothing_but_its_listed_files(tmp_path):
    folder, root = _record_folder(), tmp_path / "data"
    folder.generate(root, {"v": 1}, lambda out: (out / "a.txt").write_text("x"))
    (root / "b.txt").write_text("mine")
    survey = folder.survey(root, folder.listed_files(folder.read_record(root)))
    assert (survey.foreign, survey.missing, survey.changed) == (["b.txt"], [], [])
    with pytest.raises(ValueError, match=r"entries its record does not list \(b.txt\)"):
        folder.remove(root, survey)
    assert sorted(p.name for p in root.iterdir()) == ["RECORD.json", "a.txt", "b.txt"]
    (root / "b.txt").unlink()
    folder.remove(root, folder.survey(root, folder.listed_files(folder.read_record(root))))
    assert list(tmp_path.iterdir()) == []
