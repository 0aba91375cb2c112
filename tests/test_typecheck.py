"""The static type check: static tools resolve natzoo's subpackages, and the project's check catches misspelt APIs.

The project's check is ``python -m mypy`` with ``[tool.mypy]`` of pyproject.toml (run by ``.ci/run`` before the test
suite). These tests run mypy on small files with that configuration; they reuse a copy of the repository's
``.mypy_cache`` when there is one (after ``.ci/run``'s check there is), otherwise their first mypy call analyses torch
and takes a couple of minutes.
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"


def _readme_test_command() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    commands = [line for block in blocks for line in block.splitlines() if "python -m pytest" in line]
    assert len(commands) == 1, commands
    return commands[0]


def test_ci_runs_the_readme_test_command_verbatim():
    command = _readme_test_command()
    assert "python -m mypy" in command and "editable_mode=strict" in command, command
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f"README: {command!r}; .ci/run: {ci_lines}"
    # ... in a fresh virtual environment, as the README makes one, activated before the command
    venv = next(i for i, line in enumerate(ci_lines) if line.startswith("python3 -m venv "))
    assert "bin/activate" in ci_lines[venv] and venv < ci_lines.index(command), ci_lines


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory) -> Path:
    """A private mypy cache, seeded from the repository's (so torch is not analysed again), never written back."""
    cache = tmp_path_factory.mktemp("mypy") / "cache"
    if (REPO / ".mypy_cache").is_dir():
        shutil.copytree(REPO / ".mypy_cache", cache)
    return cache


def _mypy(*args: str, cwd: Path, cache: Path, python: str | None = None,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT), "--cache-dir", str(cache),
           "--no-error-summary", "--hide-error-context", "--no-pretty", "--no-color-output"]
    if python is not None:
        cmd += ["--python-executable", python]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


def _child_environment(env_dir: Path) -> tuple[str, dict[str, str]]:
    """A virtual environment that sees this interpreter's packages after its own, and the environment to run it in.

    ``system_site_packages=True`` would show the base Python's packages instead: inside a virtual environment (the
    README's) those are not the ones this test runs with (an old setuptools without ``bdist_wheel``, say). A ``.pth``
    file lists this interpreter's site folders as plain paths (their own ``.pth`` files, such as an editable natzoo,
    are not read), after the child's own site folder; ``PYTHONPATH`` is dropped so that only the child's install of
    natzoo can be found.
    """
    import os
    import site

    venv.create(env_dir, with_pip=False)
    python = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    parents = [*site.getsitepackages(), site.getusersitepackages()]
    (Path(purelib) / "_parent_site.pth").write_text("".join(f"{p}\n" for p in parents if Path(p).is_dir()))
    return python, env


def _revealed(stdout: str) -> dict[int, str]:
    return {int(m[1]): m[2] for m in re.finditer(r':(\d+): note: Revealed type is "(.*)"', stdout)}


def _assert_real_signature(revealed: str, func) -> None:
    assert revealed.startswith("def ("), revealed  # a callable, not Any
    for name, param in inspect.signature(func).parameters.items():
        assert re.search(rf"\b{name}: ", revealed), (name, revealed)
        if param.annotation is not inspect.Parameter.empty:
            assert not re.search(rf"\b{name}: Any\b", revealed), (name, revealed)
    assert "->" in revealed and not revealed.endswith("-> Any"), revealed


PROBE = """\
from natzoo.ops import na2d
from natzoo.models import load_weights
reveal_type(na2d)
reveal_type(load_weights)
"""
# Calls with a misspelt argument: the check sees through natzoo.ops and natzoo.models.
PROBE_WRONG_CALLS = """\
import torch
from natzoo.ops import na2d
from natzoo.models import load_weights
q = torch.zeros(1, 8, 8, 1, 4)
na2d(q, q, q, kernal_size=3)
load_weights(torch.nn.Linear(1, 1), {}, use_emma=True)
"""


@pytest.mark.slow  # a virtual environment, an install and mypy
def test_editable_install_resolves_ops_and_models_outside_the_checkout(tmp_path: Path, mypy_cache: Path):
    import natzoo.models
    import natzoo.ops

    # The README's editable install (strict mode), of a copy of the sources, into a private environment.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("natzoo", "ops", "models"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    python, env = _child_environment(tmp_path / "venv")
    install = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
               "--disable-pip-version-check", "-e", str(src), "--config-settings", "editable_mode=strict"]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    probe_dir = tmp_path / "elsewhere"  # outside the checkout: only the installed natzoo is on the search path
    probe_dir.mkdir()
    (probe_dir / "probe.py").write_text(PROBE)
    proc = _mypy("--verbose", "probe.py", cwd=probe_dir, cache=mypy_cache, python=python, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    revealed = _revealed(proc.stdout)
    _assert_real_signature(revealed[3], natzoo.ops.na2d)
    _assert_real_signature(revealed[4], natzoo.models.load_weights)
    assert "LoadReport" in revealed[4], revealed[4]
    # ... and mypy read them from this install, through a plain path (no import hook).
    link_tree = f"{src}/build/__editable__"
    for package in ("ops", "models"):
        # mypy's log names the file of each module it parses, or whose cache entry it checks.
        files = set(re.findall(rf"(/\S+/natzoo/{package}/__init__\.py)", proc.stderr))
        assert files and all(f.startswith(link_tree) for f in files), (package, files)


def test_checkout_resolves_ops_and_models(mypy_cache: Path, tmp_path: Path):
    import natzoo.models
    import natzoo.ops

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    proc = _mypy(str(probe), cwd=REPO, cache=mypy_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    revealed = _revealed(proc.stdout)
    _assert_real_signature(revealed[3], natzoo.ops.na2d)
    _assert_real_signature(revealed[4], natzoo.models.load_weights)

    probe.write_text(PROBE_WRONG_CALLS)
    proc = _mypy(str(probe), cwd=REPO, cache=mypy_cache)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r'probe\.py:5: error: Unexpected keyword argument "kernal_size" for "na2d"', proc.stdout), proc.stdout
    assert re.search(r'probe\.py:6: error: Unexpected keyword argument "use_emma" for "load_weights"', proc.stdout), (
        proc.stdout
    )


# A call of something each library does not have, one per line, then the same with the real name.
LIBRARY_CALLS = [
    ("import torch", "torch.cuda.Event(enable_timing=True).elapsedtime_ms(torch.cuda.Event())",
     "torch.cuda.Event(enable_timing=True).elapsed_time(torch.cuda.Event())"),
    ("import torch", "torch.cuda.synchronise()", "torch.cuda.synchronize()"),
    ("import timm", "timm.create_modle('resnet18')", "timm.create_model('resnet18')"),
    ("import lightning", "lightning.Trainer().fitt", "lightning.Trainer().fit"),
    ("import lightning.pytorch as pl", "pl.callbacks.ModelCheckpont()", "pl.callbacks.ModelCheckpoint()"),
    ("import triton", "triton.cdivv(5, 2)", "triton.cdiv(5, 2)"),
    ("import triton.language as tl", "tl.program_idd", "tl.program_id"),
    ("import torchvision", "torchvision.ops.box_iouu", "torchvision.ops.box_iou"),
]


def test_project_check_knows_the_libraries_apis(mypy_cache: Path, tmp_path: Path):
    imports = sorted({imp for imp, _, _ in LIBRARY_CALLS})
    good = tmp_path / "good.py"
    good.write_text("\n".join([*imports, *(right for _, _, right in LIBRARY_CALLS)]) + "\n")
    proc = _mypy(str(good), cwd=REPO, cache=mypy_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    bad = tmp_path / "bad.py"
    bad.write_text("\n".join([*imports, *(wrong for _, wrong, _ in LIBRARY_CALLS)]) + "\n")
    proc = _mypy(str(bad), cwd=REPO, cache=mypy_cache)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    flagged = {int(m[1]) for m in re.finditer(r"bad\.py:(\d+): error: .*\[attr-defined\]", proc.stdout)}
    expected = set(range(len(imports) + 1, len(imports) + len(LIBRARY_CALLS) + 1))
    assert flagged == expected, proc.stdout


def test_project_check_catches_the_misspelt_cuda_event_timing(mypy_cache: Path, tmp_path: Path):
    source = (REPO / "benchmarks" / "bench_op.py").read_text()
    assert source.count(".elapsed_time(") == 1
    # The copy keeps its module name (bench_op) and imports, in a folder of its own.
    for variant, text in (("right", source), ("wrong", source.replace(".elapsed_time(", ".elapsedtime_ms("))):
        folder = tmp_path / variant
        folder.mkdir()
        (folder / "bench_op.py").write_text(text)
        proc = _mypy(str(folder / "bench_op.py"), cwd=REPO, cache=mypy_cache)
        if variant == "right":
            assert proc.returncode == 0, proc.stdout + proc.stderr
        else:
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert '"Event" has no attribute "elapsedtime_ms"' in proc.stdout, proc.stdout


def test_no_blanket_ignores():
    import tomllib

    config = tomllib.loads(PYPROJECT.read_text())["tool"]["mypy"]
    assert not config.get("ignore_missing_imports"), "ignore_missing_imports would hide the libraries' APIs"
    assert config.get("follow_imports", "normal") == "normal"
    for override in config.get("overrides", []):
        modules = override["module"] if isinstance(override["module"], list) else [override["module"]]
        assert not override.get("ignore_errors"), modules
        assert not override.get("ignore_missing_imports"), modules
        assert override.get("follow_imports", "normal") == "normal", modules
    bare = re.compile(r"#\s*type:\s*ignore(?!\[)")  # every ignore names its error code
    for folder in ("natzoo", "ops", "models", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text()
            assert not bare.search(text), f"{path}: `# type: ignore` without an error code"
            assert "# mypy: ignore-errors" not in text and "# mypy: disable-error-code" not in text, path
