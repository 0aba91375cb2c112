"""natzoo installed into someone else's project: one top-level package, no clash with the user's own packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
# `natzoo.<name>` subpackages that live in a top-level folder of the repository (pyproject's `package-dir`).
LINKED = {
    key.split(".", 1)[1]: value
    for key, value in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].items()
    if key.startswith("natzoo.") and value != key.replace(".", "/")
}

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


def _install_copy(work: Path, links_as_files: bool = False) -> Path:
    """`pip install --target` of a copy of the project's sources (the repository itself is left untouched).

    The copy keeps the checkout's symlinks, or, with ``links_as_files``, writes each as the small text file that git
    checks out where symlinks are off (Windows without ``core.symlinks``).
    """
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("natzoo", *LINKED.values()):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    if links_as_files:
        for name in LINKED:
            link = src / "natzoo" / name
            target = os.readlink(link)
            link.unlink()
            link.write_text(target)
    site = work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check", "--target", str(site), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return site


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    return _install_copy(tmp_path_factory.mktemp("pkg"))


def _assert_only_natzoo(site: Path) -> None:
    top = sorted(p.name for p in site.iterdir() if p.name != "bin")
    assert [n for n in top if not n.endswith(".dist-info")] == ["natzoo"], top
    for sub in ("ops", "models", "detection", "classification", "datasets", "ops/neighborhood/triton"):
        init = site / "natzoo" / sub / "__init__.py"
        assert init.is_file() and not init.is_symlink(), sub
        assert not (site / "natzoo" / sub).is_symlink(), sub
    assert (site / "natzoo" / "py.typed").is_file(), "PEP 561 marker missing: type checkers would skip natzoo"
    # The CPU backend compiles its shipped source at first use: without it every CPU call falls back.
    assert (site / "natzoo" / "ops" / "neighborhood" / "cpu" / "na_cpu.cpp").is_file()


def test_install_puts_only_natzoo_into_site_packages(installed: Path):
    _assert_only_natzoo(installed)


def test_install_without_symlinks_in_the_checkout(tmp_path: Path):
    # Wheels read ops/ and models/ through package-dir, so a checkout whose links are plain files still installs.
    site = _install_copy(tmp_path, links_as_files=True)
    _assert_only_natzoo(site)
    assert (site / "natzoo" / "ops" / "neighborhood" / "functional.py").read_bytes() == (
        REPO / "ops" / "neighborhood" / "functional.py"
    ).read_bytes()


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


def test_source_checkout_links_the_top_level_folders():
    assert {"ops", "models"} <= set(LINKED), LINKED
    for name, folder in LINKED.items():
        link = REPO / "natzoo" / name
        # Relative, so the link survives moving or cloning the checkout; committed, so every clone has it.
        assert link.is_symlink() and os.readlink(link) == f"../{folder}", (link, LINKED)
        tracked = subprocess.run(["git", "ls-files", "-s", f"natzoo/{name}"], cwd=REPO, capture_output=True,
                                 text=True, timeout=60)
        if tracked.returncode == 0 and tracked.stdout:  # not a git checkout (e.g. an unpacked archive): skip this part
            assert tracked.stdout.startswith("120000 "), f"natzoo/{name} is not committed as a symlink: {tracked.stdout}"
    code = (
        "import sys, natzoo.ops, natzoo.models; print(natzoo.ops.__file__); print(natzoo.models.__file__); "
        "print(sorted(m for m in sys.modules if m in ('ops', 'models') or m.startswith(('ops.', 'models.'))))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO / "docs", env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    ops_file, models_file, other_names = proc.stdout.splitlines()
    assert Path(ops_file) == REPO / "natzoo" / "ops" / "__init__.py"
    assert Path(ops_file).resolve() == REPO / "ops" / "__init__.py"
    assert Path(models_file).resolve() == REPO / "models" / "__init__.py"
    assert other_names == "[]"  # the folders were imported under one name only
