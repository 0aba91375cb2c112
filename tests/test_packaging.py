"""natzoo installed into someone else's project: one top-level package, no clash with the user's own packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What a user's detection project typically has: its own top-level `models` and `ops` packages.
USER_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import models, ops                      # the user's own packages, imported first
    assert models.OWNER == ops.OWNER == "user", (models.__file__, ops.__file__)

    import timm, torch
    import natzoo, natzoo.ops, natzoo.models
    from natzoo.detection import build_detector

    site = os.environ["NATZOO_SITE"]
    for mod in (natzoo, natzoo.ops, natzoo.models):
        assert mod.__file__.startswith(site), (mod.__name__, mod.__file__)
    assert sys.modules["models"].OWNER == "user" and sys.modules["ops"].OWNER == "user"

    torch.manual_seed(0)
    detector = build_detector("maskrcnn", backbone="nat_mini", num_classes=3, min_size=64, max_size=64,
                              embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], kernel_size=3)
    detector.eval()
    with torch.no_grad():
        out = detector([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "labels", "scores", "masks"}, sorted(out[0])

    q, k, v = (torch.randn(1, 9, 9, 2, 16) for _ in range(3))
    assert natzoo.ops.na2d(q, k, v, kernel_size=3, dilation=2).shape == q.shape

    model = timm.create_model("dinat_mini", num_classes=5)
    assert type(model).__module__ == "natzoo.models.nat", type(model).__module__
    print("USER PROJECT OK")
    """
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install --target` of a copy of the project's sources (the repository itself is left untouched)."""
    work = tmp_path_factory.mktemp("pkg")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("natzoo", "ops", "models"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check", "--target", str(site), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return site


def test_install_puts_only_natzoo_into_site_packages(installed: Path):
    top = sorted(p.name for p in installed.iterdir() if p.name != "bin")
    assert [n for n in top if not n.endswith(".dist-info")] == ["natzoo"], top
    for sub in ("ops", "models", "detection", "classification", "datasets", "ops/neighborhood/triton"):
        assert (installed / "natzoo" / sub / "__init__.py").is_file(), sub


def test_installed_package_in_a_project_with_its_own_models_and_ops(installed: Path, tmp_path: Path):
    project = tmp_path / "project"
    for name in ("models", "ops"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text('OWNER = "user"\n')
    (project / "main.py").write_text(USER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(installed), NATZOO_SITE=str(installed), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "main.py"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "USER PROJECT OK" in proc.stdout


def test_source_folders_cannot_be_imported_under_a_second_name():
    # With the repository root on sys.path, `import ops` would otherwise register the custom ops a second time.
    for name in ("ops", "models"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0
        assert f"import it as `natzoo.{name}`" in proc.stderr, proc.stderr


def test_source_checkout_maps_the_top_level_folders():
    code = "import natzoo.ops, natzoo.models; print(natzoo.ops.__file__); print(natzoo.models.__file__)"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO / "docs", env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    ops_file, models_file = proc.stdout.split()
    assert Path(ops_file) == REPO / "ops" / "__init__.py"
    assert Path(models_file) == REPO / "models" / "__init__.py"
