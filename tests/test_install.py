"""Training from an install: `pip install` (not editable) of the checkout, then `natzoo-train` in an empty directory
trains, and the `natzoo-eval ...` command it prints evaluates the result; nothing is written next to the package."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The demo shrunk to a few CPU-seconds; data.root stays the demo's default (under the working directory's data/).
TINY = [
    "data.generate.train_per_class=8",
    "data.generate.val_per_class=4",
    "data.batch_size=8",
    "model.kwargs.embed_dim=16",
    "model.kwargs.depths=[1,1,1,1]",
    "model.kwargs.num_heads=[1,1,2,2]",
    "+model.kwargs.kernel_size=3",
    "sched.epochs=1",
    "sched.warmup_epochs=0",
    "callbacks.progress_bar=null",
    "+trainer.enable_progress_bar=false",
]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """`pip install --target` of a copy of the checkout's sources (what `pip install <checkout>` builds)."""
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("natzoo", "ops", "models", "configs"):
        # symlinks=True: natzoo/configs stays the checkout's relative link to configs/, as in a clone
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    target = work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check", "--target", str(target), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    for name in ("TRITON_INTERPRET", "NATZOO_ROOT", "NATZOO_DATA_DIR"):
        env.pop(name, None)
    return env


def test_install_ships_configs_and_commands(site: Path):
    configs = site / "natzoo" / "configs"
    assert not configs.is_symlink() and configs.is_dir()
    shipped = {str(p.relative_to(configs)) for p in configs.rglob("*.yaml")}
    in_checkout = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped == in_checkout
    assert {"natzoo-train", "natzoo-eval"} <= {p.name for p in (site / "bin").iterdir()}


@pytest.mark.slow
def test_natzoo_train_in_an_empty_directory_then_the_printed_eval_command(site: Path, tmp_path: Path):
    work = tmp_path / "my project"
    work.mkdir()
    before = _files(site)
    env = _env(site)
    trained = subprocess.run([str(site / "bin" / "natzoo-train"), *TINY], cwd=work, env=env, capture_output=True,
                             text=True, timeout=600, check=False)
    output = trained.stdout + trained.stderr
    assert trained.returncode == 0, output[-4000:]
    assert sorted(p.name for p in work.iterdir()) == ["data", "logs"]
    runs = list((work / "logs" / "demo-nat_mini" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "best.ckpt").is_file()
    assert (runs[0] / "train.log").is_file()  # Hydra's job name is `train`, as with the repository's train.py
    assert (work / "data" / "natzoo_demo_v2" / "MANIFEST.json").is_file()

    evaluate_with = trained.stdout.split("Evaluate with: ", 1)[1].splitlines()[0]
    words = shlex.split(evaluate_with)
    assert words[0] == "natzoo-eval", evaluate_with
    words[0] = str(site / "bin" / "natzoo-eval")
    evaluated = subprocess.run(words + ["+trainer.enable_progress_bar=false"], cwd=work, env=env, capture_output=True,
                               text=True, timeout=600, check=False)
    assert evaluated.returncode == 0, evaluate_with + "\n" + (evaluated.stdout + evaluated.stderr)[-4000:]
    results = list((work / "logs" / "eval" / "runs").glob("*/eval.json"))
    assert len(results) == 1
    result = json.loads(results[0].read_text())
    assert result["source"]["ckpt_path"] == str(runs[0] / "checkpoints" / "best.ckpt")
    assert result["num_images"] == 8 * 4 and 0.0 <= result["top1"] <= 100.0
    assert _files(site) == before  # nothing written into the install


def test_python_m_natzoo_train_composes_the_installed_configs(site: Path, tmp_path: Path):
    # --cfg job prints the composed config and stops: the installed configs, the command-line override applied.
    proc = subprocess.run([sys.executable, "-m", "natzoo", "train", "--cfg", "job", "model=nat_tiny", "optim.lr=0.25"],
                          cwd=tmp_path, env=_env(site), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "name: nat_tiny" in proc.stdout and "lr: 0.25" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_python_m_natzoo_without_a_command_says_how_to_call_it(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "natzoo"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode != 0 and "usage: python -m natzoo {train|eval}" in proc.stderr


def test_train_and_evaluate_are_the_only_library_functions_of_those_names():
    import natzoo
    import natzoo.cli
    import natzoo.run.evaluation
    import natzoo.run.training

    assert natzoo.train.__module__ == "natzoo" and natzoo.evaluate.__module__ == "natzoo"
    for module in (natzoo.cli, natzoo.run.training, natzoo.run.evaluation):
        assert not {"train", "evaluate"} & set(vars(module)), module.__name__
    # no module made callable by swapping its class
    assert all(type(m) is types.ModuleType for name, m in sys.modules.items() if name.split(".")[0] == "natzoo")
