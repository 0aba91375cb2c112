"""The GPU kit (``benchmarks/gpu_kit.py``) runs end to end on CPU (``--dry-run``), so it cannot rot between GPU runs.

The dry run takes the same code path as the GPU run (Triton interpreter, tiny shapes, one configcheck case per
variant, one binary precompiled for sm_90 by a worker process). It runs in a subprocess whose ``sys.path`` starts
with stub ``hydra`` and ``omegaconf`` packages that refuse to import: the GPU machines have neither, so the kit must
not need them. A second subprocess checks the precompile contract itself: a binary built by the kit's compile path
from a recorded launch is the one Triton's JIT finds when the launcher later runs with real tensors.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "benchmarks" / "gpu_kit.py"
STEPS = ["environment", "precompile", "correctness", "ops", "models", "endtoend", "profile", "autotune", "flex",
         "extra"]
BLOCKED = ("hydra", "omegaconf", "pycocotools")  # not on the GPU machines


def _load_kit():
    spec = importlib.util.spec_from_file_location("gpu_kit", KIT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_kit", module)  # dataclasses look their module up by name
    spec.loader.exec_module(sys.modules["gpu_kit"])
    return sys.modules["gpu_kit"]


def _env(tmp: Path) -> dict[str, str]:
    stubs = tmp / "stubs"
    for name in BLOCKED:
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
    env, precompile, correctness, ops, models, endtoend, profile, autotune, flex, extra = (s["rows"]
                                                                                         for s in data["steps"])
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
    gaps = {r["name"]: r for r in correctness if r["group"].startswith("gaps")}
    assert set(gaps) == {"tiny 6x6 h2", "tiny frozen rpb fp16", "tiny fp32 TF32", "tiny int64 offsets forced"}
    assert gaps["tiny int64 offsets forced"]["int64_offsets"] and gaps["tiny fp32 TF32"]["precision"] == "tf32"
    assert "d_rpb_rel_l2" not in gaps["tiny frozen rpb fp16"] and "d_rpb_rel_l2" in gaps["tiny 6x6 h2"]
    assert {r["model"] for r in models if r.get("img/s")} == {"nat_tiny", "swin_tiny_patch4_window7_224"}
    from natzoo.ops.neighborhood.validation import BACKENDS

    wanted = {"triton", "sdpa-full"} | ({"dense"} if "dense" in BACKENDS else set())
    for rows in (ops, extra):
        timed = {r["provider"] for r in rows if r.get("fwd ms") is not None}
        assert timed == wanted, rows  # FlexAttention only in its own step, after every other row
    assert {(r["provider"], r["rpb"]) for r in flex if r.get("fwd ms") is not None} == {("flex", False),
                                                                                       ("flex", True)}
    assert {r["dispatch"] for r in endtoend if r.get("img/s")} == {"implied by the op step", "forced triton",
                                                                    "forced dense"}
    assert all(r["passed"] for r in endtoend if "logit check" in r) and sum("logit check" in r for r in endtoend) == 2
    assert profile and autotune and all(r["static model us"] > 0 for r in autotune)
    notes = [n for s in data["steps"] for n in s["notes"] if n.startswith("dispatch rule implied")]
    assert len(notes) == 2 and ("dense" not in BACKENDS or all("none" not in n for n in notes)), notes
    markdown = (out / "kit-2.md").read_text()
    assert all(f"## {name} (ok" in markdown for name in STEPS)


def test_steps_subset_and_validation(tmp_path):
    kit_module = _load_kit()
    assert kit_module.parse_steps("models,ops") == ["environment", "ops", "models"]
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
    with kit_module.counting_compiles(kit.compiles):
        for source, hit in ((src, False), (src, True), ("ir text", False)):
            knobs.compilation.listener(src=source, metadata={}, metadata_group={}, times=times, cache_hit=hit)
    assert kit.compiles == [{"kernel": "_na_fwd_kernel", "seconds": 2.001}]
    assert knobs.compilation.listener is previous


def _stub_module(tmp_path, monkeypatch, name, text):
    """A module importable here and in spawned children (they inherit ``sys.path``, which gets the kit's directory)."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(KIT.parent))
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


def test_flex_warmups_are_stopped_when_the_precompile_step_fails(tmp_path, monkeypatch):
    """The FlexAttention warm-up processes end with the precompile step even when it raises: none can share the GPU
    with a timed step."""
    kit_module = _load_kit()
    stub = _stub_module(tmp_path, monkeypatch, "kit_slow_stub", """
        import os
        import time

        def warm(*job):
            open(os.path.join(os.path.dirname(__file__), f"warming-{os.getpid()}"), "w").close()
            time.sleep(600)
    """)
    started = []

    class Recorded(kit_module.BackgroundJobs):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    def broken(*args):
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("warming-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(list(tmp_path.glob("warming-*"))) == 2  # both workers are inside a warm-up
        raise RuntimeError("triton workers failed")

    layer = kit_module.dry_plan().timing_layers[0]
    monkeypatch.setattr(kit_module, "BackgroundJobs", Recorded)
    monkeypatch.setattr(kit_module, "warm_flex", stub.warm)
    monkeypatch.setattr(kit_module, "_flex_jobs", lambda plan, steps: [(layer, 1, False, False)] * 2)
    monkeypatch.setattr(kit_module, "_precompile_triton", broken)
    kit = kit_module.Kit(kit_module.dry_plan(), kit_module.Report(str(tmp_path), {"command": "t", "started": "n"}), 60)
    kit.run("precompile", lambda k, step: kit_module.step_precompile(k, step, ["flex"]))
    kit.run("ops", lambda k, step: k.report.add(step, {"alive": sum(p.is_alive() for p in started[0].processes)}))
    steps = kit.report.steps
    assert steps[0]["status"] == "failed" and "triton workers failed" in steps[0]["error"]
    assert "stopped 2 unfinished FlexAttention warm-up process(es)" in steps[0]["notes"]
    assert steps[1]["rows"] == [{"alive": 0}]
    assert all(p.exitcode == -signal.SIGTERM for p in started[0].processes)


def test_a_check_process_that_dies_is_named_and_the_rest_still_runs(tmp_path, monkeypatch):
    """A correctness item that kills its process (as an illegal memory access kills a CUDA context) is a failed row
    naming that item; the items after it run in a fresh process and the next step runs."""
    kit_module = _load_kit()
    stub = _stub_module(tmp_path, monkeypatch, "kit_fault_stub", """
        import os
        import signal

        def run(item, plan):
            if item.name == "config 1":
                os.kill(os.getpid(), signal.SIGKILL)
            return {"name": item.name, "passed": True, "error": None}
    """)
    items = [kit_module.CheckItem("group", f"config {i}", "case") for i in range(3)]
    kit = kit_module.Kit(kit_module.dry_plan(), kit_module.Report(str(tmp_path), {"command": "t", "started": "n"}), 300)
    kit.run("correctness", lambda k, step: kit_module.run_checks(k, step, items, set(), runner=stub.run))
    kit.run("ops", lambda k, step: k.report.add(step, {"ran": True}))
    rows = kit.report.steps[0]["rows"]
    assert [(r["name"], r["passed"]) for r in rows] == [("config 0", True), ("config 1", False), ("config 2", True)]
    assert "killed by SIGKILL" in rows[1]["error"] and "FAULT" in rows[1]["error"]
    assert any("config 1" in note for note in kit.report.steps[0]["notes"])
    assert kit.report.steps[1]["rows"] == [{"ran": True}]


def test_gap_context_forces_int64_offsets_and_tf32():
    """The gap checks' switches: the launchers see 64-bit offsets on a small problem, fp32 products in TF32; both
    restored afterwards."""
    import torch
    from natzoo.ops.neighborhood.triton import backward, forward

    kit_module = _load_kit()
    layer = kit_module.dry_plan().timing_layers[0]
    gap = kit_module.GapCheck("g", layer, 1, "float32", tf32=True, wide="forced")
    small = torch.zeros(2, 3)
    torch.set_float32_matmul_precision("highest")
    with kit_module.gap_context(gap):
        assert not forward.narrow_offsets(small) and not backward.narrow_offsets(small)
        assert forward.dot_precision(torch.float32) == "tf32"
    assert forward.narrow_offsets(small) and backward.narrow_offsets(small)
    assert forward.dot_precision(torch.float32) == "ieee"
    assert kit_module.wide_batch(kit_module.WIDE_LAYER) * 49 * 3 * 16 * 32 > 2**31  # the real check's q spans it


def test_dispatch_rule_uses_gpu_kernel_time():
    """Event times (host-bound at small maps) say triton, the profiler's kernel times say dense: dense wins."""
    kit_module = _load_kit()
    rows = [{"layer": "7x7", "tokens": 49, "provider": "triton", "rpb": True, "fwd+bwd ms": 0.1,
             "fwd+bwd kernel ms": 0.05, "fwd ms": 0.04},
            {"layer": "7x7", "tokens": 49, "provider": "dense", "rpb": True, "fwd+bwd ms": 0.2,
             "fwd+bwd kernel ms": 0.03, "fwd ms": 0.05}]
    assert kit_module.layer_winners(rows) == {"7x7": "dense"}
    lines = kit_module.dispatch_rule(rows)
    assert lines[0].startswith("7x7: dense wins (fwd+bwd kernel ms") and lines[-1].endswith("every layer measured")


def test_implied_dispatch_routes_only_automatic_calls():
    import torch
    from natzoo.ops.neighborhood import functional
    from natzoo.ops.neighborhood.validation import Problem

    kit_module = _load_kit()
    original = functional.select_backend

    def problem(size):
        return Problem("na2d", 2, 1, (size, size), 1, 16, (3, 3), (1, 1), (1, 1), (False, False), 0.25,
                       torch.float32, torch.device("cpu"))

    with kit_module.implied_dispatch({((6, 6), (1, 1), 1): "dense"}):
        assert functional.select_backend(problem(6), None, False, False, 0.0) == "dense"
        assert functional.select_backend(problem(6), "reference", False, False, 0.0) == "reference"
        assert functional.select_backend(problem(6), None, False, False, 0.1) == "reference"  # dropout
        assert functional.select_backend(problem(8), None, False, False, 0.0) == original(problem(8), None)
    assert functional.select_backend is original


def test_kit_imports_nothing_the_gpu_machines_lack(tmp_path):
    """Everything the kit and its benchmarks import, eagerly or inside its steps, with Hydra, OmegaConf and
    pycocotools made unimportable."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        sys.path[:0] = [{str(ROOT / "benchmarks")!r}, {str(ROOT)!r}]

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError(name + " is blocked: the GPU machines do not have it")

        sys.meta_path.insert(0, Block())
        import gpu_kit, bench_op, bench_models, static_cost, triton_aot, timm
        import torch.nn.attention.flex_attention
        from natzoo import models, ops
        from natzoo.ops.neighborhood import dispatch, functional
        from natzoo.ops.neighborhood.triton import backward, configcheck, forward
        items = gpu_kit.check_items(gpu_kit.gpu_plan())
        assert {{i.kind for i in items}} == {{"case", "gap", "race"}}
        print("CLEAN", sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "CLEAN []" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_autotuner_timings_reads_the_autotuners_own_benchmark(monkeypatch):
    """The kit's autotune step (private Triton API, in the compat module): each autotuned launch re-benchmarked (its
    key's cached choice dropped) and the autotuner's time per config recorded; the real ``Autotuner.run`` restored
    afterwards."""
    import types

    from triton.runtime.autotuner import Autotuner

    from natzoo.ops.neighborhood.triton import compat

    config = object()

    def benchmarked(self, *args, **kwargs):
        assert self.cache == {}
        self.configs_timings = {config: [0.5, 0.4, 0.6]}
        return "launched"

    def _na_fwd_kernel():
        pass

    monkeypatch.setattr(Autotuner, "run", benchmarked)
    tuner = types.SimpleNamespace(cache={"key": config}, configs_timings=None,
                                  fn=types.SimpleNamespace(fn=_na_fwd_kernel))
    sink = []
    with compat.autotuner_timings(sink):
        assert Autotuner.run(tuner) == "launched"
    assert sink == [{"kernel": "na_fwd", "config": config, "ms": 0.5}]
    assert Autotuner.run is benchmarked
