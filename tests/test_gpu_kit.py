"""The GPU kit (``benchmarks/gpu_kit.py``) runs end to end on CPU (``--dry-run``), so it cannot rot between GPU runs.

The dry run takes the same code path as the GPU run (Triton interpreter, tiny shapes, one configcheck case per
variant, one binary precompiled for sm_90 by a worker process). It runs in a subprocess whose ``sys.path`` starts
with stub ``hydra`` and ``omegaconf`` packages that refuse to import: the GPU machines have neither, so the kit must
not need them. A second subprocess checks the precompile contract itself: a binary built by the kit's compile path
from a recorded launch is the one Triton's JIT finds when the launcher later runs with real tensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "benchmarks" / "gpu_kit.py"
STEPS = ["environment", "precompile", "correctness", "models", "ops", "extra"]


def _load_kit():
    spec = importlib.util.spec_from_file_location("gpu_kit", KIT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_kit", module)  # dataclasses look their module up by name
    spec.loader.exec_module(sys.modules["gpu_kit"])
    return sys.modules["gpu_kit"]


def _env(tmp: Path) -> dict[str, str]:
    stubs = tmp / "stubs"
    for name in ("hydra", "omegaconf"):
        (stubs / name).mkdir(parents=True, exist_ok=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on the GPU machines')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NATZOO_NA_BACKEND", "NATZOO_NA_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([str(stubs), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # a cold cache: the precompile really compiles
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kit")
    out = tmp / "out"
    out.mkdir()
    (out / "kit.md").write_text("an earlier report\n")
    proc = subprocess.run([sys.executable, str(KIT), "--dry-run", "--out", str(out)], check=False, cwd=tmp,
                          env=_env(tmp), capture_output=True, text=True, timeout=1500)
    return proc, out


@pytest.mark.slow
def test_dry_run_completes_every_step(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "kit.md").read_text() == "an earlier report\n"  # never overwritten: this run is kit-2
    data = json.loads((out / "kit-2.json").read_text())
    assert [s["name"] for s in data["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in data["steps"]), [(s["name"], s["error"]) for s in data["steps"]]
    env, precompile, correctness, models, ops, extra = (s["rows"] for s in data["steps"])
    assert env[0]["TRITON_INTERPRET"] == "1" and env[0]["kernels"] == "InterpretedFunction"
    total = next(r for r in precompile if r["kernel"] == "TOTAL Triton")
    assert total["binaries"] == total["compiled"] == 1 and total["failed"] == 0  # cold cache, sm_90 target
    assert any(r["kernel"].startswith("FlexAttention") and r["error"] is None for r in precompile)
    cases = [r for r in correctness if "variant" in r]
    assert {r["variant"] for r in cases} == {"fwd", "fwd-rpb", "dq", "dq-rpb-atomic", "dq-rpb-deterministic", "dkdv",
                                             "dkdv-rpb"}
    assert {r["dtype"] for r in cases} == {"bfloat16", "float16", "float32"}
    assert all(r["passed"] for r in correctness)
    assert any(r["group"].startswith("race") for r in correctness)
    assert {r["model"] for r in models if r.get("img/s")} == {"nat_tiny", "swin_tiny_patch4_window7_224"}
    from natzoo.ops.neighborhood.validation import BACKENDS

    wanted = {"triton", "flex", "sdpa-full"} | ({"dense"} if "dense" in BACKENDS else set())
    for rows in (ops, extra):
        timed = {r["provider"] for r in rows if r.get("fwd ms") is not None}
        assert wanted <= timed, rows
    notes = [n for s in data["steps"] for n in s["notes"] if n.startswith("dispatch rule implied")]
    assert len(notes) == 2 and ("dense" not in BACKENDS or all("none" not in n for n in notes)), notes
    markdown = (out / "kit-2.md").read_text()
    assert all(f"## {name} (ok" in markdown for name in STEPS)


def test_steps_subset_and_validation(tmp_path):
    kit_module = _load_kit()
    assert kit_module.parse_steps("ops,models") == ["environment", "models", "ops"]
    assert kit_module.parse_steps(None) == STEPS
    with pytest.raises(ValueError, match="unknown step"):
        kit_module.parse_steps("ops,timing")


def test_a_failing_step_is_recorded_and_the_next_runs(tmp_path):
    """Steps write the report as they go; an exception ends only its own step."""
    kit_module = _load_kit()
    report = kit_module.Report(str(tmp_path), {"command": "test", "started": "now"})
    kit = kit_module.Kit(kit_module.dry_plan(), report, 60)

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


def test_precompiled_binary_is_the_one_the_launch_finds(tmp_path):
    """Record a real forward launch (fused-qkv views, rpb), build it the kit's way, then run the launcher again with
    real tensors through Triton's JIT: its compile must be a cache hit on that binary (same specialisation,
    constexprs, options, target). No GPU: the driver is the kit's compile-only stand-in, so the launch itself then
    fails after the lookup, which is all this checks."""
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT / "benchmarks")!r}, {str(ROOT)!r}]
        import torch, gpu_kit
        from natzoo.ops.neighborhood.triton.forward import na_forward
        from natzoo.ops.neighborhood.validation import Problem
        from natzoo.ops.neighborhood.triton import compat
        from triton import knobs

        layer = gpu_kit.Layer("t", (9, 10), 2, 32, (3, 3), (2, 1))
        q, k, v, rpb, _, _ = gpu_kit.layer_inputs(layer, 2, torch.bfloat16, "cpu")
        problem = Problem("na2d", 2, 2, (9, 10), 2, 32, (3, 3), (1, 1), (2, 1), (False, False), 32**-0.5,
                          torch.bfloat16, q.device)
        sink = []
        with gpu_kit.recording(sink, "test"):
            na_forward(problem, q, k, v, rpb)
        assert len(sink) == 1, sink
        gpu_kit._compile_worker_init(("cuda", 90, 32), [])
        built = gpu_kit.compile_spec(sink[0])
        assert built["error"] is None and not built["cache_hit"], built
        compat.jit_function(sink[0].kernel).device_caches.clear()
        hits = []
        knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
        try:
            na_forward(problem, q, k, v, rpb)
        except Exception:
            pass  # the stand-in driver cannot launch
        assert hits == [True], hits
        print("HIT")
    """)
    env = {k: v for k, v in _env(tmp_path).items() if k != "TRITON_INTERPRET"}
    env["NATZOO_NA_AUTOTUNE"] = "off"
    proc = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "HIT" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_runtime_compiles_of_na_kernels_are_counted(tmp_path):
    """Triton's compilation listener: an NA kernel built at run time (a cache miss) is counted with its seconds;
    cache hits and other sources (Inductor's kernels, IR text) are not, and the previous listener is restored."""
    from natzoo.ops.neighborhood.triton import forward
    from triton import knobs
    from triton.knobs import CompileTimes

    kit_module = _load_kit()
    kit = kit_module.Kit(kit_module.dry_plan(), kit_module.Report(str(tmp_path), {"command": "t", "started": "n"}), 9)
    src = type("Src", (), {"fn": forward._na_fwd_kernel})()
    times = CompileTimes(ir_initialization=1000, lowering_stages=[("ttir", 2_000_000)], store_results=0)
    previous = knobs.compilation.listener
    with kit_module.counting_compiles(kit):
        for source, hit in ((src, False), (src, True), ("ir text", False)):
            knobs.compilation.listener(src=source, metadata={}, metadata_group={}, times=times, cache_hit=hit)
    assert kit.compiles == [{"kernel": "_na_fwd_kernel", "seconds": 2.001}]
    assert knobs.compilation.listener is previous
