"""The GPU kit (``benchmarks/gpu_kit.py``) runs end to end on CPU (``--dry-run``), so it cannot rot between GPU runs.

The dry run takes the same code path as the GPU run (Triton interpreter, tiny shapes). It runs in a subprocess whose
``sys.path`` starts with stub ``hydra`` and ``omegaconf`` packages that refuse to import: the GPU machines have
neither, so the kit must not need them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "benchmarks" / "gpu_kit.py"
STEPS = ["1. environment", "2. correctness", "3. op timing", "4. model throughput"]


def _load_kit():
    spec = importlib.util.spec_from_file_location("gpu_kit", KIT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_kit", module)  # dataclasses look their module up by name
    spec.loader.exec_module(sys.modules["gpu_kit"])
    return sys.modules["gpu_kit"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kit")
    stubs = tmp / "stubs"
    for name in ("hydra", "omegaconf"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on the GPU machines')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NATZOO_NA_BACKEND", "NATZOO_NA_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([str(stubs), env.get("PYTHONPATH", "")])
    out = tmp / "out"
    proc = subprocess.run([sys.executable, str(KIT), "--dry-run", "--out", str(out), "--budget", "1200"],
                          check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    return proc, out


@pytest.mark.slow
def test_dry_run_completes_every_step(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "kit.json").read_text())
    assert [s["name"] for s in data["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in data["steps"]), [(s["name"], s["error"]) for s in data["steps"]]
    env, correctness, timing, models = (s["rows"] for s in data["steps"])
    assert env[0]["TRITON_INTERPRET"] == "1" and env[0]["kernels"] == "InterpretedFunction"
    checks = [r for r in correctness if r["check"] == "vs reference fp64"]
    assert {r["dtype"] for r in checks} == {"bfloat16", "float16", "float32"}
    assert all(r["pass"] for r in correctness)
    assert any(r["check"].startswith("race") for r in correctness)
    providers = {(r["provider"], r["rpb"]) for r in timing if r.get("fwd ms") is not None}
    assert {("triton", True), ("triton", False), ("sdpa-dense", False), ("flex", False)} <= providers
    assert {r["model"] for r in models if r.get("img/s")} == {"nat_tiny", "swin_tiny_patch4_window7_224"}
    markdown = (out / "kit.md").read_text()
    assert all(f"## {name} (ok" in markdown for name in STEPS)


def test_a_failing_step_is_recorded_and_the_next_runs(tmp_path):
    """Steps write the report as they go; an exception ends only its own step."""
    kit_module = _load_kit()
    report = kit_module.Report(str(tmp_path), {"command": "test", "started": "now"})
    kit = kit_module.Kit(kit_module.dry_plan(), report, budget_s=60)

    def broken(kit, step):
        kit.report.add(step, {"row": 1})
        assert json.loads((tmp_path / "kit.json").read_text())["steps"][0]["rows"] == [{"row": 1}]
        raise RuntimeError("boom")

    kit.run("first", broken)
    kit.run("second", lambda kit, step: kit.report.add(step, {"row": 2}))
    data = json.loads((tmp_path / "kit.json").read_text())
    assert [(s["name"], s["status"]) for s in data["steps"]] == [("first", "failed"), ("second", "ok")]
    assert "RuntimeError: boom" in data["steps"][0]["error"]
    assert "## first (failed" in (tmp_path / "kit.md").read_text()
