"""Reliability, round four: the three items round three left open (docs/reliability.md, section 15).

* a user's ``--config-dir`` folder wins over natzoo's own configs for files of the same name, on every entry point;
* ``++key=value`` adding a key nothing reads is refused like ``+key=value`` (setting an existing key is accepted);
* a damaged file in a timm folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) is named, with
  what is wrong with it, on every route that loads such a folder;
* found on the way: a refused run no longer leaves empty ``logs/<name>/runs`` folders when the clock's second turned
  between Hydra's early claim of a run directory and the job's own.

Each test failed on the code before its fix. Everything is composed or read in-process (no training run).
"""

from __future__ import annotations

import contextlib
import json
import re
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
NATZOO_CONFIGS = REPO / "configs"


# --- 1. --config-dir: the user's folder before natzoo's configs -------------------------------------------------------

@pytest.fixture()
def user_configs(tmp_path, monkeypatch) -> Path:
    """A user's config folder with files named like natzoo's, and one that extends natzoo's ``data/folder.yaml``."""
    monkeypatch.chdir(tmp_path)  # Hydra's run-directory names resolve under the working directory
    folder = tmp_path / "my_configs"
    (folder / "data").mkdir(parents=True)
    (folder / "experiment").mkdir()
    own = {**yaml.safe_load((NATZOO_CONFIGS / "data" / "folder.yaml").read_text()), "name": "users_own_folder",
           "batch_size": 3}
    (folder / "data" / "folder.yaml").write_text(yaml.safe_dump(own))
    (folder / "experiment" / "nat_tiny_in1k.yaml").write_text("# @package _global_\nrun_name: users_own_experiment\n")
    return folder


def _composed(entry: str, words: list[str], capsys, monkeypatch) -> dict:
    """The job config an entry point composes (``--cfg job``: Hydra prints it and runs nothing), in this process."""
    from hydra.core.global_hydra import GlobalHydra

    from natzoo.run.console import set_program

    capsys.readouterr()
    try:
        if entry == "script":  # python train.py / eval.py
            command = "train" if words[0] == "train" else "eval"
            monkeypatch.setattr(sys, "argv", [f"{command}.py", *words[1:], "--cfg", "job"])
            runpy.run_path(str(REPO / f"{command}.py"), run_name="__main__")
        elif entry == "module":  # python -m natzoo train|eval
            from natzoo.cli import main

            monkeypatch.setattr(sys, "argv", ["natzoo"])
            main([*words, "--cfg", "job"])
        else:  # natzoo-train / natzoo-eval
            from natzoo.cli import eval_main, train_main

            monkeypatch.setattr(sys, "argv", [f"natzoo-{words[0]}", *words[1:], "--cfg", "job"])
            (train_main if words[0] == "train" else eval_main)()
    finally:
        GlobalHydra.instance().clear()
        set_program("script")
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("entry", ["script", "module", "console"])
def test_a_user_config_dir_wins_over_natzoos_configs_of_the_same_name(user_configs, capsys, monkeypatch, entry):
    # Hydra searched --config-dir after natzoo's folder: my_configs/data/folder.yaml was silently not read.
    natzoo_folder = yaml.safe_load((NATZOO_CONFIGS / "data" / "folder.yaml").read_text())
    assert natzoo_folder["name"] != "users_own_folder"
    cfg = _composed(entry, ["train", "--config-dir", str(user_configs), "data=folder"], capsys, monkeypatch)
    assert (cfg["data"]["name"], cfg["data"]["batch_size"]) == ("users_own_folder", 3)
    assert cfg["task"] == "classification" and cfg["model"]["name"]  # natzoo's train.yaml and groups still apply
    cfg = _composed(entry, ["train", "--config-dir", str(user_configs), "experiment=nat_tiny_in1k"], capsys,
                    monkeypatch)
    assert cfg["run_name"] == "users_own_experiment"
    cfg = _composed(entry, ["eval", "--config-dir", str(user_configs), "data=folder", "random_weights=true"], capsys,
                    monkeypatch)
    assert cfg["data"]["name"] == "users_own_folder"


def test_config_dir_keeps_extending_natzoos_configs_and_nothing_changes_without_it(user_configs, capsys,
                                                                                    monkeypatch):
    natzoo_folder = yaml.safe_load((NATZOO_CONFIGS / "data" / "folder.yaml").read_text())
    # Without --config-dir: natzoo's own file.
    assert _composed("console", ["train", "data=folder"], capsys, monkeypatch)["data"]["name"] == natzoo_folder["name"]
    # A user config extends natzoo's by name when the user folder has no file of that name.
    (user_configs / "data" / "folder.yaml").unlink()
    (user_configs / "data" / "colours.yaml").write_text("defaults:\n  - folder\nname: colours\n")
    cfg = _composed("console", ["train", "--config-dir", str(user_configs), "data=colours"], capsys, monkeypatch)
    assert cfg["data"]["name"] == "colours"
    assert cfg["data"]["_target_"] == natzoo_folder["_target_"]
    assert cfg["data"]["batch_size"] == natzoo_folder["batch_size"]


def test_commands_a_run_prints_repeat_the_users_config_dir(user_configs, tmp_path, monkeypatch):
    # The `Evaluate with:` / resume commands name the user's folder (now Hydra's primary one), not natzoo's.
    import natzoo
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from natzoo.cli import main
    from natzoo.run.console import command, set_program
    from natzoo.run.hydra_setup import config_file

    seen = {}

    def fake_train(cfg):  # the real Hydra run of `python -m natzoo train`, without training
        seen.update(command=command("eval"), folder=config_file("data/folder.yaml"), name=cfg.data.name,
                    demo=config_file("data/demo.yaml"))
        return {"best_score": None}

    monkeypatch.setattr(natzoo, "train", fake_train)
    monkeypatch.setattr(sys, "argv", ["natzoo"])
    try:
        main(["train", "--config-dir", str(user_configs), "data=folder", f"paths.log_dir={tmp_path / 'logs'}",
              "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"])
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        set_program("script")
    assert seen["command"] == ["python", "-m", "natzoo", "eval", "--config-dir", str(user_configs)]
    assert seen["name"] == "users_own_folder"
    assert seen["folder"] == user_configs / "data" / "folder.yaml"
    assert seen["demo"].resolve() == (NATZOO_CONFIGS / "data" / "demo.yaml").resolve()


# --- 2. ++key=value that nothing reads --------------------------------------------------------------------------------

@contextlib.contextmanager
def _command_line(config_name: str, overrides: list[str]) -> Iterator:
    """The config as ``train.py``/``eval.py`` compose it, with Hydra's record of the command line set."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from natzoo.run.hydra_setup import register_with_hydra

    register_with_hydra()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(NATZOO_CONFIGS), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        yield cfg
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize("stage, added, message", [
    ("fit", "++optim.lrr=1", r"\+\+optim\.lrr=1: no setting 'optim\.lrr' exists in train\.py's config"),
    ("fit", "++foo=1", r"no setting 'foo' exists"),
    ("fit", "++pretrained=true", r"train\.py does not use 'pretrained' .* pass checkpoint=<file>"),
    ("fit", "++trainer.bogus=1", r"Lightning's Trainer has no argument 'bogus'"),
    ("eval", "++sched.epochs=3", r"eval\.py does not use 'sched\.epochs'"),
])
def test_a_key_added_with_plus_plus_that_nothing_reads_is_refused(tmp_path, monkeypatch, stage, added, message):
    # `++key` skipped the check: ++optim.lrr=1 trained with the default learning rate, without a word.
    from natzoo.classification import task as classification
    from natzoo.run.training import check_run_config

    def forbidden(*args, **kwargs):
        raise AssertionError("built before the config check refused the run")

    monkeypatch.setattr(classification, "build_module", forbidden)
    monkeypatch.setattr(classification, "build_datamodule", forbidden)
    extra = ["debug=tiny"] if stage == "fit" else ["random_weights=true"]
    with _command_line("train" if stage == "fit" else "eval",
                       [f"paths.data_dir={tmp_path}", f"paths.log_dir={tmp_path / 'logs'}", *extra, added]) as cfg:
        with pytest.raises(ValueError, match=message) as refused:
            check_run_config(cfg, stage)
    assert getattr(refused.value, "natzoo_config_error", False)


def test_plus_plus_setting_an_existing_key_or_a_table_handed_on_is_accepted(tmp_path):
    from natzoo.config import COMMON_RULES
    from natzoo.run.training import _keys_before_force_adds, check_added_keys

    # paths.log_dir and eval.py's checkpoint are keys of the composed config without a value rule; the others are
    # entries of tables handed on as they are, or a rule.
    for stage, config_name, added in [
        ("fit", "train", ["++paths.log_dir=" + str(tmp_path), "++model.kwargs.mlp_ratio=2.0",
                          "++trainer.fast_dev_run=1", "++callbacks.extra._target_=a.B", "++optim.lr=0.01"]),
        ("eval", "eval", ["++checkpoint=" + str(tmp_path / "w.pth"), "++data.root=" + str(tmp_path)]),
    ]:
        with _command_line(config_name, added):
            check_added_keys(added, COMMON_RULES, stage, _keys_before_force_adds(added))
    # Outside a Hydra run (no record of the command line), a `++key` is checked like `+key`.
    with pytest.raises(ValueError, match=r"no setting 'paths\.log_dir'"):
        check_added_keys(["++paths.log_dir=x"], COMMON_RULES, "fit", _keys_before_force_adds(["++paths.log_dir=x"]))


# --- 3. a damaged file in a timm folder is named ----------------------------------------------------------------------

def _timm_folder(root: Path, name: str, weights: str = "model.safetensors") -> Path:
    """A timm folder of a registered architecture whose weights file is small (the damage is found before any
    model is built)."""
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "nat_mini", "num_classes": 3,
                                                    "pretrained_cfg": {"input_size": [3, 32, 32]}}, indent=2))
    tensors = {"head.weight": torch.zeros(3, 8), "head.bias": torch.zeros(3)}
    if weights == "model.safetensors":
        save_file(tensors, str(folder / weights))
    else:
        torch.save(tensors, folder / weights)
    return folder


def _cut(file: Path, keep: int) -> None:
    file.write_bytes(file.read_bytes()[:keep])


def _damaged_folders(root: Path) -> list[tuple[Path, Path, str]]:
    """(folder, damaged file, what the message must say)."""
    cases = []
    folder = _timm_folder(root, "cut_weights")
    size = (folder / "model.safetensors").stat().st_size
    _cut(folder / "model.safetensors", size - 10)
    cases.append((folder, folder / "model.safetensors", rf"is truncated: {size - 10} of the {size} bytes"))
    folder = _timm_folder(root, "cut_header")
    _cut(folder / "model.safetensors", 20)
    cases.append((folder, folder / "model.safetensors", r"is truncated: 20 bytes, but its header alone takes"))
    folder = _timm_folder(root, "text_weights")
    (folder / "model.safetensors").write_text("<html>404 Not Found</html>\n")
    cases.append((folder, folder / "model.safetensors", r"is not a safetensors file"))
    folder = _timm_folder(root, "cut_bin", "pytorch_model.bin")
    _cut(folder / "pytorch_model.bin", (folder / "pytorch_model.bin").stat().st_size // 2)
    cases.append((folder, folder / "pytorch_model.bin", r"is truncated: a zip archive \(torch\.save's format\)"))
    folder = _timm_folder(root, "cut_config")
    _cut(folder / "config.json", 30)
    cases.append((folder, folder / "config.json", r"is truncated: its JSON object is not closed"))
    folder = _timm_folder(root, "text_config")
    (folder / "config.json").write_text("architecture = nat_mini\n")
    cases.append((folder, folder / "config.json", r"is not JSON"))
    return cases


def test_a_damaged_file_in_a_timm_folder_is_named_on_every_route(tmp_path):
    # safetensors' SafetensorError ("incomplete metadata, file not fully covered") named no file; a pytorch_model.bin
    # folder was refused as lacking model.safetensors; a cut config.json read "cannot be read as JSON".
    import timm

    from natzoo.models import read_state_dict
    from natzoo.tools.sources import load_model
    from natzoo.tools.timm_export import read_timm_folder

    for folder, damaged, what in _damaged_folders(tmp_path):
        named = f"{re.escape(str(damaged))}'? {what}"
        for route in (lambda: read_timm_folder(folder), lambda: load_model(str(folder))):  # natzoo-export / -predict
            with pytest.raises(ValueError, match=named):
                route()
        if damaged.name != "config.json":
            # timm's own loader of the folder (natzoo's architectures check the weights first), and the weights file
            # given as checkpoint= / pretrained_cfg_overlay=dict(file=...).
            with pytest.raises(ValueError, match=named):
                timm.create_model(f"local-dir:{folder}", pretrained=True)
            with pytest.raises(ValueError, match=named):
                read_state_dict(damaged)


def test_whole_weights_files_are_not_called_damaged(tmp_path):
    from natzoo.models import damaged_weights

    folder = _timm_folder(tmp_path, "whole")
    assert damaged_weights(folder / "model.safetensors") is None
    torch.save({"w": torch.zeros(4)}, tmp_path / "whole.bin")
    assert damaged_weights(tmp_path / "whole.bin") is None


# --- Found on the way: a refused run left empty parent folders when the clock's second turned ------------------------

def test_a_refused_run_leaves_no_parent_folders_when_the_second_turned_between_claims(tmp_path, monkeypatch):
    # Hydra's early resolution claimed logs/<name>/runs/<T> (creating logs/<name>/runs), the job's own claim came a
    # second later (<T+1>, parents already there); the refused run removed both directories but left the parents.
    from natzoo.run import rundir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir, "_CLAIMED", {})
    early = Path(rundir.claim_fresh_dir("logs/demo-nat_mini/runs/2026-01-01_00-00-00"))
    own = Path(rundir.claim_fresh_dir(str(tmp_path / "logs" / "demo-nat_mini" / "runs" / "2026-01-01_00-00-01")))
    (own / ".hydra").mkdir()
    (own / ".hydra" / "config.yaml").write_text("seed: 1\n")
    rundir.release_other_claims(own)
    assert not early.exists() and own.is_dir()
    assert rundir.discard_unused(own)
    assert list(tmp_path.iterdir()) == []
