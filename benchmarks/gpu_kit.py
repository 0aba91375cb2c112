"""GPU kit: checks and measures the fused NA kernels on one GPU in one call (about 6 minutes on an H100, cold caches).

Usage::

    python benchmarks/gpu_kit.py --out $OUT/kit               # one GPU, cold Triton/Inductor caches included
    python benchmarks/gpu_kit.py --out $OUT/kit --steps models,ops
    python benchmarks/gpu_kit.py --dry-run --out /tmp/kit     # CPU, Triton interpreter, tiny shapes (CI)

Steps, ordered by what they decide (``--steps`` picks a subset; the environment always runs):

1. ``environment``: GPU, driver, versions, ``TRITON_INTERPRET`` forced off (on in ``--dry-run``);
2. ``precompile``: every Triton kernel binary the selected steps will launch, compiled before anything is timed by
   worker processes on all CPU cores into the shared Triton cache, and every FlexAttention graph of the op steps
   compiled by GPU worker processes into the shared Inductor caches; compile time reported on its own. The launches
   are recorded by running the steps' own code once with every Triton launch intercepted (nothing runs on the GPU's
   NA kernels), and each worker compiles through Triton's own JIT path (``JITFunction.run(warmup=True)``) for the
   parent's device target, so the later launches find exactly these binaries (same specialisation, constexprs,
   options, target); every later step reports the NA kernels Triton still had to compile (expected 0);
3. ``correctness``: every entry of every kernel's search space forced one at a time (forward; dQ without rpb, with
   the atomic and the deterministic rpb gradient; dK/dV with and without rpb) in bf16, fp16 and fp32 against the
   float64 reference (``natzoo.ops.neighborhood.triton.configcheck``), first at the NAT-Tiny and DiNAT-Tiny layer
   problems at a batch that shares the timed batch's binaries, then the other head-dim classes and ranks; then a race
   check (repeated forward+backward bit-identical, atomic d_rpb bounded, deterministic d_rpb bit-identical);
4. ``models``: ``nat_tiny``, Swin-T, ``dinat_tiny``, ConvNeXt-T (Swin-T second, so the ratio always exists), bf16
   autocast, batch 128, channels-last; inference and a training step; img/s, peak memory, ratio to Swin-T;
5. ``ops``: every NAT-Tiny/DiNAT-Tiny layer at batch 128: ``triton`` and ``dense`` backends with rpb, ``triton``
   without, compiled FlexAttention (NA mask) and SDPA over all tokens; forward and forward+backward (CUDA events,
   median); then the dispatch rule the numbers imply;
6. ``extra``: head_dim 64 and 128 2-D rows and a 3-D row.

Every step has its own time budget and the run a total one; a row that would not fit is skipped and noted. The
report (``kit.json`` and ``kit.md``; ``kit-2.*``, ``kit-3.*``... when an earlier report is in ``--out``, which is
never overwritten) is rewritten after every row, so a run cut short keeps everything measured so far; a step that
raises is recorded and the next one runs. It needs torch, triton, timm and the repository (put on ``sys.path`` here;
no install, no Hydra, no network). See docs/benchmarks.md for the expected time of every step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib
import inspect
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
STEP_NAMES = ("environment", "precompile", "correctness", "models", "ops", "extra")
NA_KERNELS = "natzoo."  # module prefix of the kernels the kit precompiles and counts


@dataclasses.dataclass(frozen=True)
class Layer:
    """One NA problem: a map `spatial` with `heads` heads of `head_dim`, kernel `kernel` and dilation `dilation`."""

    name: str
    spatial: tuple[int, ...]
    heads: int
    head_dim: int
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    rpb: bool = True


def nat_layers() -> list[Layer]:
    """The NAT-Tiny and DiNAT-Tiny layer problems at 224 px (maps 56/28/14/7, heads 2/4/8/16; dilations 8/4/2)."""
    layers = []
    for size, heads, dil in ((56, 2, 8), (28, 4, 4), (14, 8, 2), (7, 16, 1)):
        layers.append(Layer(f"nat-tiny {size}x{size} h{heads}", (size, size), heads, 32, (7, 7), (1, 1)))
        if dil > 1:
            layers.append(Layer(f"dinat-tiny {size}x{size} h{heads} d{dil}", (size, size), heads, 32, (7, 7),
                                (dil, dil)))
    return layers


@dataclasses.dataclass(frozen=True)
class CheckGroup:
    """Configcheck cases of one priority class: ``configcheck.cases`` arguments and an optional problem per rank."""

    label: str
    ranks: tuple[int, ...]
    dtypes: tuple[str, ...]
    head_dims: tuple[int, ...]
    layer: Layer | None = None  # checked at this map/heads/window (batch `Plan.check_batch`); None: configcheck's
    sample: bool = False  # dry run: the first entry of each variant only, in one dtype (the dtypes taken in turn)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything that differs between the GPU run and the dry run; the code path is the same."""

    device: str
    check_batch: int  # shares binaries with timing_batch (Triton specialises ints on == 1 and % 16 only)
    check_groups: tuple[CheckGroup, ...]
    race_layer: Layer
    race_runs: int
    deterministic_runs: int
    models: tuple[str, ...]
    model_batch: int
    model_dtype: str | None
    model_warmup: int
    model_iters: int
    timing_batch: int
    timing_layers: tuple[Layer, ...]
    extra_layers: tuple[tuple[Layer, int], ...]  # (layer, batch)
    warmup: int
    repeats: int
    compile_flex: bool
    budgets: dict[str, float]  # seconds per step
    total_budget: float
    compile_limit: int | None  # at most this many Triton binaries precompiled (the dry run's smoke test)
    flex_workers: bool  # compile the FlexAttention graphs in GPU worker processes during the precompile step
    row_reserve: dict[str, float]  # a row of this kind starts only with this much of its step's budget left


ALL_DTYPES = ("bfloat16", "float16", "float32")


def gpu_plan() -> Plan:
    layers = nat_layers()
    nat = Layer("nat 28x28 h4 (check)", (28, 28), 4, 32, (7, 7), (1, 1))
    dinat = Layer("dinat 28x28 h4 d4 (check)", (28, 28), 4, 32, (7, 7), (4, 4))
    return Plan(
        device="cuda", check_batch=16,
        check_groups=(CheckGroup("NAT-Tiny layer, head_dim 32", (2,), ALL_DTYPES, (32,), nat),
                      CheckGroup("DiNAT-Tiny layer, head_dim 32", (2,), ALL_DTYPES, (32,), dinat),
                      CheckGroup("2-D, head_dim 64/128", (2,), ALL_DTYPES, (64, 128)),
                      CheckGroup("1-D, head_dim 32/64/128", (1,), ALL_DTYPES, (32, 64, 128)),
                      CheckGroup("3-D, head_dim 32/64/128", (3,), ALL_DTYPES, (32, 64, 128)),
                      CheckGroup("head_dim 256", (1, 2, 3), ALL_DTYPES, (256,))),
        race_layer=layers[1], race_runs=20, deterministic_runs=3,
        models=("nat_tiny", "swin_tiny_patch4_window7_224", "dinat_tiny", "convnext_tiny"), model_batch=128,
        model_dtype="bf16", model_warmup=3, model_iters=10,
        timing_batch=128, timing_layers=tuple(layers),
        extra_layers=((Layer("2d 64x64 k13 hd64", (64, 64), 8, 64, (13, 13), (1, 1), rpb=False), 8),
                      (Layer("2d 64x64 k13 hd128", (64, 64), 8, 128, (13, 13), (1, 1), rpb=False), 8),
                      (Layer("3d 16x32x32 k3x7x7 hd64", (16, 32, 32), 8, 64, (3, 7, 7), (1, 1, 1), rpb=False), 1)),
        warmup=5, repeats=20, compile_flex=True,
        budgets={"environment": 30, "precompile": 170, "correctness": 100, "models": 80, "ops": 90, "extra": 40},
        total_budget=500, compile_limit=None, flex_workers=True,
        row_reserve={"case": 0.5, "model": 15, "op": 3, "flex": 10},
    )


def dry_plan() -> Plan:
    tiny = (Layer("tiny 8x8 h1", (8, 8), 1, 16, (3, 3), (1, 1)), Layer("tiny 8x8 h1 d2", (8, 8), 1, 16, (3, 3), (2, 2)))
    return Plan(
        device="cpu", check_batch=1,
        check_groups=(CheckGroup("tiny 2-D, first entries", (2,), ALL_DTYPES, (16,), tiny[1], sample=True),),
        race_layer=tiny[0], race_runs=2, deterministic_runs=2,
        models=("nat_tiny", "swin_tiny_patch4_window7_224"), model_batch=1, model_dtype=None, model_warmup=0,
        model_iters=1,
        timing_batch=1, timing_layers=tiny[1:],
        extra_layers=((Layer("tiny 3d 4x4x4 k3", (4, 4, 4), 1, 16, (3, 3, 3), (1, 1, 1), rpb=False), 1),),
        warmup=0, repeats=1, compile_flex=False,
        # Generous: the dry run checks code paths on shared CI machines, where a budget skip would hide one.
        budgets=dict.fromkeys(STEP_NAMES, 1200.0), total_budget=3600, compile_limit=1, flex_workers=True,
        row_reserve={"case": 0.0, "model": 0.0, "op": 0.0, "flex": 0.0},
    )


# ------------------------------------------------------------------------------------------------------- report


def report_paths(out_dir: str) -> tuple[str, str]:
    """``kit.json``/``kit.md`` in `out_dir`, or the first ``kit-N`` pair of which neither file exists yet."""
    for n in range(1, 1000):
        stem = "kit" if n == 1 else f"kit-{n}"
        paths = (os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md"))
        if not any(os.path.exists(p) or os.path.exists(p + ".tmp") for p in paths):
            return paths
    raise FileExistsError(f"--out {out_dir!r} already holds 999 kit reports; choose another directory")


class Report:
    """The kit's results, rewritten to its JSON and markdown files (atomically) after every change.

    Files already in `out_dir` are never touched: the report takes the first free ``kit[-N]`` name.
    """

    def __init__(self, out_dir: str, meta: dict[str, Any]) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.json_path, self.md_path = report_paths(out_dir)
        self.data: dict[str, Any] = {"meta": meta, "steps": []}
        self.write()

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.data["steps"]

    def step(self, name: str) -> dict[str, Any]:
        step: dict[str, Any] = {"name": name, "status": "running", "seconds": None, "budget_s": None, "rows": [],
                                "notes": [], "error": None}
        self.steps.append(step)
        self.write()
        return step

    def add(self, step: dict[str, Any], row: dict[str, Any]) -> None:
        step["rows"].append(row)
        print(f"  [{step['name']}] " + ", ".join(f"{k}={_cell(v)}" for k, v in row.items()), flush=True)
        self.write()

    def note(self, step: dict[str, Any], text: str) -> None:
        step["notes"].append(text)
        print(f"  [{step['name']}] {text}", flush=True)
        self.write()

    def write(self) -> None:
        for path, text in ((self.json_path, json.dumps(self.data, indent=1, default=str)),
                           (self.md_path, self.markdown())):
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)

    def markdown(self) -> str:
        meta = self.data["meta"]
        lines = ["# GPU kit results", "", f"Command: `{meta['command']}`; started {meta['started']}.", ""]
        for step in self.steps:
            seconds = "" if step["seconds"] is None else f", {step['seconds']:.0f} s"
            budget = "" if step["budget_s"] is None else f" of {step['budget_s']:.0f} s budget"
            lines += [f"## {step['name']} ({step['status']}{seconds}{budget})", ""]
            lines += table(step["rows"])
            lines += [f"* {note}" for note in step["notes"]]
            if step["error"]:
                lines += ["", "```", step["error"], "```"]
            lines.append("")
        return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table lines of `rows` (columns: every key, in first-seen order; missing cells ``-``)."""
    if not rows:
        return []
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines + [""]


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


class Kit:
    """Runs the steps, each against its own budget and the run's total budget; a step that raises is recorded."""

    def __init__(self, plan: Plan, report: Report, total_budget: float | None = None) -> None:
        self.plan = plan
        self.report = report
        self.deadline = time.monotonic() + (plan.total_budget if total_budget is None else total_budget)
        self.step_deadline = self.deadline
        self.compiles: list[dict[str, Any]] = []  # NA kernel compilations seen in this process (cache misses)
        self.uncovered: set[str] | None = None  # check groups the precompile step did not finish (None: not run)

    def left(self) -> float:
        """Seconds left to the current step (its own budget and the run's)."""
        return min(self.deadline, self.step_deadline) - time.monotonic()

    def run(self, name: str, fn: Callable[[Kit, dict[str, Any]], None]) -> None:
        budget = min(self.plan.budgets.get(name, math.inf), self.deadline - time.monotonic())
        print(f"== {name} ({budget:.0f} s budget)", flush=True)
        step = self.report.step(name)
        step["budget_s"] = budget
        start = time.monotonic()
        self.step_deadline = start + budget
        misses_before = len(self.compiles)
        try:
            fn(self, step)
            step["status"] = "ok"
        except Exception:  # noqa: BLE001 - recorded in the report, the kit goes on with the next step
            step["status"] = "failed"
            step["error"] = traceback.format_exc()[-4000:]
            print(step["error"], flush=True)
        finally:
            step["seconds"] = time.monotonic() - start
            misses = self.compiles[misses_before:]
            if misses and name != "precompile":
                names = sorted({m["kernel"] for m in misses})
                self.report.note(step, f"{len(misses)} NA kernel binaries compiled during this step (not "
                                       f"precompiled): {', '.join(names)}, {sum(m['seconds'] for m in misses):.1f} s")
            self.step_deadline = self.deadline
            self.report.write()


@contextlib.contextmanager
def counting_compiles(kit: Kit) -> Iterator[None]:
    """Records every Triton compilation of an NA kernel in this process that missed the on-disk cache."""
    from natzoo.ops.neighborhood.triton import compat

    def listener(**event: Any) -> None:
        if event.get("cache_hit", True):
            return
        try:  # other compilations (Inductor's kernels, IR sources) are not ours to count
            key = _kernel_key(event["src"].fn)
        except (AttributeError, KeyError, TypeError):
            return
        if key.startswith(NA_KERNELS):
            kit.compiles.append({"kernel": key.rsplit(":", 1)[-1], "seconds": _total_seconds(event.get("times"))})

    with compat.compilation_listener(listener):
        yield


def _total_seconds(times: Any) -> float:
    """Seconds in Triton's ``CompileTimes`` (microseconds); 0 when the Triton version reports none."""
    try:
        return float(times.total) / 1e6
    except (AttributeError, TypeError):
        return 0.0


# ------------------------------------------------------------------------------------------------- step 1: environment


def step_environment(kit: Kit, step: dict[str, Any]) -> None:
    import torch
    import triton
    from natzoo.ops.neighborhood.triton import forward, tiling

    row: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda runtime": torch.version.cuda,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "(unset)"),
        "NATZOO_NA_AUTOTUNE": tiling.autotune_mode(),
        "kernels": type(forward._na_fwd_kernel).__name__,
        "commit": _git_commit(),
        "cpus": os.cpu_count(),
    }
    try:
        import timm

        row["timm"] = timm.__version__
    except ImportError:
        row["timm"] = "missing"
    if kit.plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        row.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), driver=_driver_version())
    else:
        row.update(gpu="none (dry run: CPU, Triton interpreter)")
    kit.report.add(step, row)
    if kit.plan.device == "cuda" and row["kernels"] != "JITFunction":
        raise RuntimeError(f"kernels are {row['kernels']}, not compiled JIT functions (TRITON_INTERPRET leaked?)")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], check=False,
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------ step 2: precompile


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One Triton binary to build: a kernel launch as the JIT sees it, with one autotuning config applied.

    Tensors are kept as ``("tensor", dtype name, data_ptr)``: the JIT specialises a pointer only on its dtype and on
    ``data_ptr % 16``, so a stand-in with the same two facts binds exactly like the tensor.
    """

    kernel: str  # Triton's JIT registry key "module:qualname"
    name: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    config: tuple[tuple[str, Any], ...]  # ``triton.Config.all_kwargs()`` of one config; () for a plain launch
    source: str  # the workload that launches it

    def dedupe_key(self) -> tuple[Any, ...]:
        """What Triton's JIT specialises on (ints: == 1, % 16, 32-bit range; pointers: dtype, % 16; constexprs)."""
        constexpr = set(_constexpr_names(self.kernel))
        names = _arg_names(self.kernel)
        bound = list(zip(names, self.args)) + list(self.kwargs)
        return (self.kernel, tuple((n, v if n in constexpr else _spec_class(v)) for n, v in bound), self.config)


def _spec_class(value: Any) -> Any:
    if isinstance(value, tuple) and value[:1] == ("tensor",):
        return ("tensor", value[1], value[2] % 16 == 0)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, -(2**31) <= value < 2**31)
    return type(value).__name__


def _python_fn(kernel: Any) -> types.FunctionType:
    """The decorated Python function under an Autotuner / JITFunction / InterpretedFunction."""
    fn = kernel
    while not isinstance(fn, types.FunctionType):
        fn = fn.fn
    return fn


def _kernel_key(kernel: Any) -> str:
    fn = _python_fn(kernel)
    return f"{fn.__module__}:{fn.__qualname__}"


def _signature(key: str) -> inspect.Signature:
    module, qualname = key.split(":")
    return inspect.signature(_python_fn(getattr(importlib.import_module(module), qualname)))


def _arg_names(key: str) -> list[str]:
    return list(_signature(key).parameters)


def _constexpr_names(key: str) -> list[str]:
    return [name for name, p in _signature(key).parameters.items() if "constexpr" in str(p.annotation)]


def _plain(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).removeprefix("torch."), value.data_ptr())
    return value


@contextlib.contextmanager
def recording(sink: list[CompileSpec], source: str) -> Iterator[None]:
    """Inside the block every Triton kernel launch is recorded in `sink` (one spec per config) instead of run.

    Autotuned launches record every config the autotuner would benchmark (after its pruning; a single config is
    launched unpruned, as Triton does). Works on compiled and interpreted kernels alike.
    """
    from natzoo.ops.neighborhood.triton import compat

    def record(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any], configs: list[Any] | None,
               grid: Any) -> None:
        key = _kernel_key(kernel)
        plain_args = tuple(_plain(a) for a in args)
        plain_kwargs = tuple(sorted((k, _plain(v)) for k, v in kwargs.items()))
        for config in configs if configs is not None else [None]:
            cfg = tuple(sorted(config.all_kwargs().items())) if config is not None else ()
            sink.append(CompileSpec(key, _python_fn(kernel).__name__, plain_args, plain_kwargs, cfg, source))

    with compat.intercepted_launches(record):
        yield


def _compile_worker_init(target: tuple[str, Any, int], paths: list[str]) -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled kernels, never the interpreter
    _add_paths(paths)
    from natzoo.ops.neighborhood.triton import compat

    compat.use_compile_only_target(target)  # the parent's target, no device touched


def compile_spec(spec: CompileSpec) -> dict[str, Any]:
    """Builds one binary through Triton's own JIT path (``run(warmup=True)``: bind, specialise, compile, no launch).

    Runs in a worker set up by `_compile_worker_init`; the binary lands in the Triton cache shared with the parent.
    """
    import torch

    from natzoo.ops.neighborhood.triton import compat

    def real(value: Any) -> Any:
        if isinstance(value, tuple) and value[:1] == ("tensor",):
            return compat.mock_tensor(getattr(torch, value[1]), value[2])
        return value

    hits: list[bool] = []
    start, cpu = time.perf_counter(), _cpu_seconds()
    try:
        kernel = compat.jit_function(spec.kernel)  # through the kernel's module: no registry in Triton 3.6
        with compat.compilation_listener(lambda **kw: hits.append(kw["cache_hit"])):
            compat.warm_up(kernel, tuple(real(a) for a in spec.args),
                           {**{k: real(v) for k, v in spec.kwargs}, **dict(spec.config)})
        error = None
    except Exception as exc:  # noqa: BLE001 - reported per binary; the launch then fails the same way in its step
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return {"kernel": spec.name, "seconds": time.perf_counter() - start, "cpu_s": _cpu_seconds() - cpu,
            "cache_hit": bool(hits) and all(hits), "error": error}


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas runs as a child)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def usable_cpus() -> int:
    """CPUs this process may use: its affinity set, capped by a cgroup v2 CPU quota; at most 32 workers.

    ``os.cpu_count()`` counts the host's CPUs, which a container may be far from allowed to use (and every worker
    holds a few hundred MiB of imports).
    """
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, min(count, 32))


def compile_target(device: str) -> tuple[str, Any, int]:
    """The parent's Triton target (backend, arch, warp size); sm_90 for the dry run, which has no GPU."""
    if device != "cuda":
        return ("cuda", 90, 32)
    from natzoo.ops.neighborhood.triton import compat

    return compat.current_target()


def capture_workloads(kit: Kit, steps: list[str]) -> Iterator[list[CompileSpec]]:
    """Runs the selected steps' launching code once under `recording`, yielding the NA binaries of each workload.

    Priority order (the compile workers take them first come, first served): the configcheck groups of the timed
    layers and the race check, the models, the op rows, the extra rows, then the other configcheck groups.
    """
    plan = kit.plan
    core = tuple(g for g in plan.check_groups if g.layer is not None)
    rest = tuple(g for g in plan.check_groups if g.layer is None)
    workloads: list[tuple[str, Callable[[Kit, list[CompileSpec]], None]]] = [
        ("correctness", lambda k, sink: correctness_workload(k, sink, core, race=True)),
        ("models", models_workload), ("ops", ops_workload), ("extra", extra_workload),
        ("correctness", lambda k, sink: correctness_workload(k, sink, rest, race=False)),
    ]
    for name, workload in workloads:
        if name in steps:
            sink: list[CompileSpec] = []
            workload(kit, sink)
            yield [spec for spec in sink if spec.kernel.startswith(NA_KERNELS)]


def step_precompile(kit: Kit, step: dict[str, Any], steps: list[str]) -> None:
    import torch

    plan = kit.plan
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    flex = _flex_jobs(plan, steps) if plan.flex_workers else []
    flex_pool, flex_futures = None, []
    if flex:
        # GPU workers compile the FlexAttention graphs into Inductor's caches while the CPU workers build Triton's.
        env_threads = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # one process per graph already
        flex_pool = concurrent.futures.ProcessPoolExecutor(max_workers=min(len(flex), 8), mp_context=ctx,
                                                           initializer=_add_paths, initargs=(sys.path[:],))
        flex_futures = [flex_pool.submit(warm_flex, *job) for job in flex]
        if env_threads is None:
            os.environ.pop("TORCHINDUCTOR_COMPILE_THREADS")
        else:
            os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = env_threads
    target = compile_target(plan.device)
    workers = max(1, min(usable_cpus(), plan.compile_limit or 4096))
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                  initializer=_compile_worker_init, initargs=(target, sys.path[:]))
    futures: dict[concurrent.futures.Future[dict[str, Any]], CompileSpec] = {}
    keys: dict[tuple[Any, ...], concurrent.futures.Future[dict[str, Any]]] = {}
    needs: dict[str, list[tuple[Any, ...]]] = {}  # check group -> the binaries its cases launch
    captured = 0
    try:
        for specs in capture_workloads(kit, steps):  # compiling starts while the next workload is captured
            captured += len(specs)
            for spec in specs:
                key = spec.dedupe_key()
                if spec.source.startswith("check: "):
                    needs.setdefault(spec.source.removeprefix("check: "), []).append(key)
                if key in keys or (plan.compile_limit is not None and len(futures) >= plan.compile_limit):
                    continue
                keys[key] = pool.submit(compile_spec, spec)
                futures[keys[key]] = spec
        kit.report.note(step, f"captured {captured} launches in {time.perf_counter() - start:.1f} s: "
                              f"{len(futures)} distinct binaries to build for {target} on {workers} worker processes")
        results = _collect(kit, step, futures)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if plan.compile_limit is None:  # the dry run's interpreter needs no binaries
        done = {key for key, future in keys.items() if future.done() and not future.cancelled()}
        kit.uncovered = {group for group, wanted in needs.items() if not set(wanted) <= done}
        for group in sorted(kit.uncovered):
            kit.report.note(step, f"check group {group!r} not fully precompiled within the budget: the correctness "
                                  "step skips it (pytest -m gpu checks every config)")
    triton_s = time.perf_counter() - start
    _report_compiles(kit, step, results, triton_s)
    if flex_pool is not None:
        for future, job in zip(flex_futures, flex):
            try:
                result = future.result(timeout=max(1.0, kit.left()))
            except concurrent.futures.TimeoutError:
                result = {"layer": job[0].name, "error": "precompile budget spent"}
            except Exception as exc:  # noqa: BLE001 - a worker failure leaves the compile to the op step
                result = {"layer": job[0].name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            kit.report.add(step, {"kernel": f"FlexAttention {result.pop('layer')}", **result})
        flex_pool.shutdown(wait=all(f.done() for f in flex_futures), cancel_futures=True)
    kit.report.note(step, f"compile time on its own: {time.perf_counter() - start:.1f} s wall ({workers} worker "
                          "processes); later steps list any NA binary they still had to compile")
    if plan.device == "cuda":
        torch.cuda.empty_cache()


def _collect(kit: Kit, step: dict[str, Any],
             futures: dict[concurrent.futures.Future[dict[str, Any]], CompileSpec]) -> list[dict[str, Any]]:
    results = []
    try:
        for future in concurrent.futures.as_completed(futures, timeout=max(1.0, kit.left())):
            result = future.result()
            result["source"] = futures[future].source
            results.append(result)
    except concurrent.futures.TimeoutError:
        kit.report.note(step, f"precompile budget spent after {len(results)} of {len(futures)} binaries: the rest "
                              "compile when first launched")
    return results


def _report_compiles(kit: Kit, step: dict[str, Any], results: list[dict[str, Any]], wall_s: float) -> None:
    by_kernel: dict[str, dict[str, Any]] = {}
    for r in results:
        row = by_kernel.setdefault(r["kernel"], {"kernel": r["kernel"], "binaries": 0, "compiled": 0,
                                                 "already cached": 0, "failed": 0, "cpu s": 0.0, "max s": 0.0})
        row["binaries"] += 1
        row["failed"] += r["error"] is not None
        row["already cached"] += r["cache_hit"] and r["error"] is None
        row["compiled"] += not r["cache_hit"] and r["error"] is None
        row["cpu s"] += r["cpu_s"]
        row["max s"] = max(row["max s"], r["seconds"])
    for row in by_kernel.values():
        kit.report.add(step, row)
    failed = [r for r in results if r["error"]]
    for r in failed[:10]:
        kit.report.note(step, f"FAILED {r['kernel']} ({r['source']}): {r['error']}")
    if len(failed) > 10:
        kit.report.note(step, f"... and {len(failed) - 10} more failed builds (see kit.json)")
    compiled = [r for r in results if not r["cache_hit"] and r["error"] is None]
    kit.report.add(step, {"kernel": "TOTAL Triton", "binaries": len(results), "compiled": len(compiled),
                          "already cached": sum(r["cache_hit"] for r in results),
                          "failed": sum(r["error"] is not None for r in results),
                          "cpu s": sum(r["cpu_s"] for r in results), "wall s": wall_s,
                          "cpu s per compiled binary": (sum(r["cpu_s"] for r in compiled) / len(compiled)
                                                        if compiled else None)})


def _flex_jobs(plan: Plan, steps: list[str]) -> list[tuple[Layer, int, bool]]:
    jobs: list[tuple[Layer, int, bool]] = []
    if "ops" in steps:
        jobs += [(layer, plan.timing_batch, plan.compile_flex) for layer in plan.timing_layers]
    if "extra" in steps:
        jobs += [(layer, batch, plan.compile_flex) for layer, batch in plan.extra_layers]
    return jobs if plan.device == "cuda" else jobs[:1]


def _add_paths(paths: list[str]) -> None:
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)


def warm_flex(layer: Layer, batch: int, compile_flex: bool) -> dict[str, Any]:
    """Runs one FlexAttention forward (+ backward on CUDA) of `layer` as the op step does, filling the caches."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    fwd, backward = flex_fn(layer, batch, dtype, device, compile_flex)
    with torch.no_grad():
        fwd()  # the op rows time a no-grad forward (its own graph) and a forward+backward
    if backward:
        out = fwd()
        out.backward(torch.ones_like(out))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return {"layer": layer.name, "wall s": time.perf_counter() - start, "error": None}


# ------------------------------------------------------------------------------------------------ step 3: correctness


def layer_inputs(layer: Layer, batch: int, dtype: Any, device: str, seed: int = 0) -> tuple[Any, ...]:
    """q, k, v as the modules pass them (views of one fused qkv projection), a float32 rpb, dO and dLSE."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(batch, *layer.spatial, 3 * layer.heads * layer.head_dim, device=device, generator=g)
    q, k, v = qkv.to(dtype).unflatten(-1, (3, layer.heads, layer.head_dim)).unbind(-3)
    rpb = None
    if layer.rpb:
        rpb = torch.randn(layer.heads, *(2 * x - 1 for x in layer.kernel), device=device, generator=g) * 0.5
    grad_out = torch.randn(q.shape, device=device, generator=g)
    grad_lse = torch.randn(q.shape[:-1], device=device, generator=g)
    return q, k, v, rpb, grad_out, grad_lse


def forward_backward(layer: Layer, q: Any, k: Any, v: Any, rpb: Any, grad_out: Any, grad_lse: Any, backend: str,
                     dtype: Any = None) -> tuple[Any, Any, list[Any]]:
    """out, lse and the gradients of ``<out, dO> + <lse, dLSE>`` w.r.t. q, k, v (and rpb)."""
    import torch

    from natzoo import ops

    dtype = dtype or q.dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    bias = None
    if rpb is not None:
        bias = rpb.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    fn = getattr(ops, f"na{len(layer.spatial)}d")
    out, lse = fn(*leaves, layer.kernel, dilation=layer.dilation, rpb=bias, return_lse=True, backend=backend)
    loss = (out.double() * grad_out.double()).sum() + (lse.double() * grad_lse.double()).sum()
    grads = torch.autograd.grad(loss, leaves + ([bias] if bias is not None else []))
    return out.detach(), lse.detach(), [g.detach() for g in grads]


def check_cases(plan: Plan) -> list[tuple[CheckGroup, Any]]:
    """(group, configcheck case) in priority order: the timed layers' classes first."""
    import torch
    from natzoo.ops.neighborhood.triton import configcheck

    out = []
    for group in plan.check_groups:
        shapes = None
        if group.layer is not None:
            layer = group.layer
            shapes = {len(layer.spatial): configcheck.Shape(layer.spatial, layer.kernel, layer.dilation,
                                                            (False,) * len(layer.spatial), heads=layer.heads,
                                                            batch=plan.check_batch)}
        cases = configcheck.cases(ranks=group.ranks, dtypes=[getattr(torch, d) for d in group.dtypes],
                                  head_dims=group.head_dims, shapes=shapes)
        if group.sample:
            firsts = [case for case in cases if case.index == 0]
            variants = list(dict.fromkeys(case.variant for case in firsts))
            cases = [case for case in firsts
                     if case.dtype == getattr(torch, group.dtypes[variants.index(case.variant) % len(group.dtypes)])]
        out += [(group, case) for case in cases]
    return out


def correctness_workload(kit: Kit, sink: list[CompileSpec], groups: tuple[CheckGroup, ...], race: bool) -> None:
    from natzoo.ops.neighborhood.triton import configcheck

    for group, case in check_cases(dataclasses.replace(kit.plan, check_groups=groups)):
        with recording(sink, f"check: {group.label}"):
            configcheck.run_case(case, kit.plan.device)
    if race:
        with recording(sink, "race check"):
            race_check(kit, None)


def step_correctness(kit: Kit, step: dict[str, Any]) -> None:
    import torch
    from natzoo.ops.neighborhood.triton import configcheck

    torch.set_float32_matmul_precision("highest")  # fp32 checked with IEEE products
    cases = check_cases(kit.plan)
    summary: dict[str, dict[str, Any]] = {}
    failures = 0
    for group, case in cases:
        counts = summary.setdefault(group.label, {"group": group.label, "cases": 0, "passed": 0, "failed": 0,
                                                  "not run (budget)": 0})
        counts["cases"] += 1
        if kit.left() < kit.plan.row_reserve["case"] or (kit.uncovered and group.label in kit.uncovered):
            counts["not run (budget)"] += 1
            continue
        row = configcheck.run_case(case, kit.plan.device)
        counts["passed" if row["passed"] else "failed"] += 1
        failures += not row["passed"]
        kit.report.add(step, {"group": group.label, **row})
    failures += race_check(kit, step)
    for counts in summary.values():
        kit.report.note(step, "{group}: {cases} cases, {passed} passed, {failed} failed, {not run (budget)} not run "
                              "(budget)".format(**counts))
    kit.report.note(step, "every entry of every kernel's search space forced one at a time against the float64 "
                          f"reference (configcheck; check batch {kit.plan.check_batch} shares the timed batch's "
                          "binaries)")
    if failures:
        raise AssertionError(f"{failures} correctness check(s) failed (see the rows)")


def race_check(kit: Kit, step: dict[str, Any] | None) -> int:
    """Repeated forward+backward: out, lse, dq, dk, dv bit-identical; d_rpb bounded (atomic) / identical.

    With `step` None (the precompile capture) every launch runs once and nothing is reported.
    """
    import torch

    plan, layer = kit.plan, kit.plan.race_layer
    runs, det_runs = (plan.race_runs, plan.deterministic_runs) if step is not None else (1, 1)
    q, k, v, rpb, grad_out, grad_lse = layer_inputs(layer, plan.check_batch, torch.bfloat16, plan.device, 1)
    first = forward_backward(layer, q, k, v, rpb, grad_out, grad_lse, "triton")
    mismatches, drift = 0, 0.0
    for _ in range(runs - 1):
        again = forward_backward(layer, q, k, v, rpb, grad_out, grad_lse, "triton")
        mismatches += sum(not torch.equal(a, b) for a, b in zip([first[0], first[1], *first[2][:3]],
                                                                 [again[0], again[1], *again[2][:3]]))
        drift = max(drift, ((again[2][3] - first[2][3]).norm() / first[2][3].norm()).item())
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = [forward_backward(layer, q, k, v, rpb, grad_out, grad_lse, "triton")[2][3] for _ in range(det_runs)]
    finally:
        torch.use_deterministic_algorithms(previous)
    if step is None:
        return 0
    det_equal = all(torch.equal(det[0], d) for d in det[1:])
    ok = mismatches == 0 and drift <= 1e-5 and det_equal
    kit.report.add(step, {"group": f"race: {runs} fwd+bwd runs", "name": layer.name, "dtype": "bfloat16",
                          "bitwise mismatches (out, lse, dq, dk, dv)": mismatches,
                          "atomic d_rpb max rel drift": drift, "deterministic d_rpb identical": det_equal,
                          "passed": ok})
    return int(not ok)


# --------------------------------------------------------------------------------------------------- step 4: models


def models_workload(kit: Kit, sink: list[CompileSpec]) -> None:
    import torch
    from bench_models import bench_model

    plan = kit.plan
    if plan.device != "cuda":
        return  # automatic dispatch runs the reference path on CPU: the models launch no Triton kernel there
    dtype = {"bf16": torch.bfloat16, None: None}[plan.model_dtype]
    for name in plan.models:
        if not name.startswith(("nat", "dinat")):
            continue
        with recording(sink, f"model {name}"):
            bench_model(name, torch.device(plan.device), plan.model_batch, 224, dtype, plan.device == "cuda", 0, 1,
                        ["infer", "train"])
        if plan.device == "cuda":
            torch.cuda.empty_cache()


def step_models(kit: Kit, step: dict[str, Any]) -> None:
    import torch
    from bench_models import bench_model

    plan = kit.plan
    device = torch.device(plan.device)
    dtype = {"bf16": torch.bfloat16, None: None}[plan.model_dtype]
    if plan.device == "cuda":
        torch.backends.cudnn.benchmark = True
    for name in plan.models:
        if kit.left() < plan.row_reserve["model"]:
            kit.report.note(step, f"{name}: skipped (time budget)")
            continue
        try:
            rows = bench_model(name, device, plan.model_batch, 224, dtype, plan.device == "cuda", plan.model_warmup,
                               plan.model_iters, ["infer", "train"])
        except Exception as exc:  # noqa: BLE001 - one model failing is a row, not the end
            kit.report.add(step, {"model": name, "note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"})
            continue
        finally:
            if plan.device == "cuda":
                torch.cuda.empty_cache()
        for r in rows:
            kit.report.add(step, {"model": name, "mode": r["mode"], "batch": plan.model_batch, "img/s": r["img_s"],
                                  "ms/batch": r["seconds"] * 1e3, "peak MiB": r["peak_mib"],
                                  "params M": r["params"]})
    swin = {r["mode"]: r["img/s"] for r in step["rows"] if r["model"].startswith("swin") and "img/s" in r}
    for row in step["rows"]:
        if "img/s" in row and row["mode"] in swin:
            row["x Swin-T"] = row["img/s"] / swin[row["mode"]]
    kit.report.note(step, f"{plan.model_dtype or 'fp32'} autocast, channels-last={plan.device == 'cuda'}, "
                          f"{plan.model_warmup} warm-up + median of {plan.model_iters} iterations; train step = "
                          "forward, cross-entropy, backward, AdamW step")
    kit.report.write()


# ----------------------------------------------------------------------------------------------- step 5/6: op timing


def useful_scores(layer: Layer, batch: int) -> int:
    """batch * heads * sum over queries of the neighbourhood size (non-causal windows hold exactly k keys)."""
    return batch * layer.heads * math.prod(layer.spatial) * math.prod(layer.kernel)


def providers(layer: Layer) -> list[tuple[str, bool]]:
    """(provider, rpb) rows per layer: the NA backends with the layer's rpb, Triton without, Flex and SDPA."""
    rows = [("triton", layer.rpb), ("dense", layer.rpb)]
    if layer.rpb:
        rows.append(("triton", False))
    return rows + [("flex", False), ("sdpa-full", False)]


def flex_fn(layer: Layer, batch: int, dtype: Any, device: str, compile_flex: bool) -> tuple[Callable[[], Any], bool]:
    """(FlexAttention forward with the NA block mask on fresh fused-qkv inputs, whether it has a backward here).

    Shared by the op rows and the precompile workers, so both build the same graph.
    """
    import torch
    from bench_op import Shape, na_mask_mod
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    backward = device == "cuda"  # FlexAttention has no backward on CPU
    q, k, v, _, _, _ = layer_inputs(layer, batch, dtype, device)
    tokens = math.prod(layer.spatial)
    flat = [(t.detach().requires_grad_() if backward else t.detach()).reshape(batch, tokens, layer.heads,
                                                                              layer.head_dim).transpose(1, 2)
            for t in (q, k, v)]
    shape = Shape(layer.name, batch, layer.spatial, layer.heads, layer.head_dim, layer.kernel, layer.dilation)
    block_mask = create_block_mask(na_mask_mod(shape), None, None, tokens, tokens, device=device)
    torch._dynamo.reset()  # a fresh compile per shape: no silent eager fallback after the recompile limit
    if compile_flex:
        flex = torch.compile(flex_attention)
    else:
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        flex = flex_attention

    def fwd() -> Any:
        return flex(flat[0], flat[1], flat[2], block_mask=block_mask)

    return fwd, backward


def time_provider(layer: Layer, batch: int, provider: str, with_rpb: bool, dtype: Any, plan: Plan,
                  bandwidth: float | None) -> dict[str, Any]:
    """One op row: forward and forward+backward milliseconds (median), useful TFLOP/s, peak memory."""
    import torch
    from bench_op import compiled_graphs, time_ms

    from natzoo import ops

    n, tokens, note = len(layer.spatial), math.prod(layer.spatial), ""
    backward, graphs = True, 0
    if provider in ("triton", "dense"):
        q, k, v, rpb, _, _ = layer_inputs(layer, batch, dtype, plan.device)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        rpb = rpb.requires_grad_() if with_rpb and rpb is not None else None
        fn = getattr(ops, f"na{n}d")

        def fwd() -> Any:
            return fn(q, k, v, layer.kernel, dilation=layer.dilation, rpb=rpb, backend=provider)

    elif provider == "flex":
        fwd, backward = flex_fn(layer, batch, dtype, plan.device, plan.compile_flex)
        graphs = compiled_graphs()
    else:
        q, k, v, _, _, _ = layer_inputs(layer, batch, dtype, plan.device)
        flat = [t.detach().requires_grad_().reshape(batch, tokens, layer.heads, layer.head_dim).transpose(1, 2)
                for t in (q, k, v)]
        note = "all N^2 scores"

        def fwd() -> Any:
            return torch.nn.functional.scaled_dot_product_attention(*flat)

    grad: list[Any] = []

    def fwdbwd() -> None:
        out = fwd()
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])

    if plan.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    first = time.perf_counter()
    with torch.no_grad():
        fwd()  # the first call compiles (FlexAttention) or loads (Triton) what the timed calls run
    first_s = time.perf_counter() - first
    with torch.no_grad():
        fwd_ms = time_ms(fwd, plan.device, plan.warmup, plan.repeats)
    fwdbwd_ms = time_ms(fwdbwd, plan.device, plan.warmup, plan.repeats) if backward else None
    if provider == "flex":
        made = compiled_graphs() - graphs
        if not plan.compile_flex:
            note = "eager, forward only (dry run)"
        else:
            note = f"compiled ({made} graphs after dynamo reset)" if made else "EAGER: no graph compiled"
    flops = 4.0 * useful_scores(layer, batch) * layer.head_dim
    row: dict[str, Any] = {"fwd ms": fwd_ms, "fwd+bwd ms": fwdbwd_ms, "first call s": first_s,
                           "fwd useful TFLOP/s": flops / (fwd_ms * 1e-3) / 1e12,
                           "fwd+bwd useful TFLOP/s": 3.5 * flops / (fwdbwd_ms * 1e-3) / 1e12 if fwdbwd_ms else None}
    if bandwidth is not None:
        moved = 4 * batch * tokens * layer.heads * layer.head_dim * dtype.itemsize  # q, k, v read, out written once
        row["fwd % of bandwidth floor"] = 100.0 * moved / bandwidth / (fwd_ms * 1e-3)
        row["peak MiB"] = torch.cuda.max_memory_allocated() / 2**20
    row["note"] = note
    return row


def _timing_dtype(plan: Plan) -> Any:
    import torch

    return torch.bfloat16 if plan.device == "cuda" else torch.float32


def _capture_rows(kit: Kit, sink: list[CompileSpec], rows: list[tuple[Layer, int]], source: str) -> None:
    """Records the Triton launches of the `triton` rows of `rows` (one forward and one forward+backward each)."""
    plan = dataclasses.replace(kit.plan, warmup=0, repeats=1)
    for layer, batch in rows:
        for provider, with_rpb in providers(layer):
            if provider == "triton":
                with recording(sink, f"{source} {layer.name}"):
                    time_provider(layer, batch, provider, with_rpb, _timing_dtype(plan), plan, None)


def ops_workload(kit: Kit, sink: list[CompileSpec]) -> None:
    _capture_rows(kit, sink, [(layer, kit.plan.timing_batch) for layer in kit.plan.timing_layers], "ops")


def extra_workload(kit: Kit, sink: list[CompileSpec]) -> None:
    _capture_rows(kit, sink, list(kit.plan.extra_layers), "extra")


def time_rows(kit: Kit, step: dict[str, Any], rows: list[tuple[Layer, int]]) -> None:
    import torch
    from bench_op import device_limits

    plan = kit.plan
    dtype = _timing_dtype(plan)
    bandwidth, peak = device_limits(plan.device, dtype)
    if bandwidth is not None and peak is not None:
        kit.report.note(step, f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s, {dtype} matmul peak "
                              f"{peak / 1e12:.0f} TFLOP/s (8192^3) on this device")
    for layer, batch in rows:
        for provider, with_rpb in providers(layer):
            reserve = plan.row_reserve["flex" if provider == "flex" else "op"]
            if kit.left() < reserve:
                kit.report.note(step, f"{layer.name} {provider}: skipped (time budget)")
                continue
            row: dict[str, Any] = {"layer": layer.name, "tokens": math.prod(layer.spatial), "batch": batch,
                                   "provider": provider, "rpb": with_rpb}
            try:
                row.update(time_provider(layer, batch, provider, with_rpb, dtype, plan, bandwidth))
            except Exception as exc:  # noqa: BLE001 - one provider failing on one shape is a row, not the end
                row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            finally:
                if plan.device == "cuda":
                    torch.cuda.empty_cache()
            kit.report.add(step, row)


def step_ops(kit: Kit, step: dict[str, Any]) -> None:
    time_rows(kit, step, [(layer, kit.plan.timing_batch) for layer in kit.plan.timing_layers])
    for line in dispatch_rule(step["rows"]):
        kit.report.note(step, line)


def step_extra(kit: Kit, step: dict[str, Any]) -> None:
    time_rows(kit, step, list(kit.plan.extra_layers))
    for line in dispatch_rule(step["rows"]):
        kit.report.note(step, line)


def dispatch_rule(rows: list[dict[str, Any]]) -> list[str]:
    """The backend choice the timings imply: per layer the faster of triton and dense (fwd+bwd, else fwd), then the
    token threshold below which dense wins everywhere, if one exists; FlexAttention against triton without rpb."""
    lines = []
    winners: list[tuple[int, str, str]] = []
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    for layer in layers:
        by = {(r["provider"], r["rpb"]): r for r in rows if r["layer"] == layer and r.get("fwd ms") is not None}
        rpb = any(r["rpb"] for r in rows if r["layer"] == layer)
        tri, den = by.get(("triton", rpb)), by.get(("dense", rpb))
        metric = "fwd+bwd ms" if tri and den and tri.get("fwd+bwd ms") and den.get("fwd+bwd ms") else "fwd ms"
        parts = []
        if tri and den:
            winner = "dense" if den[metric] < tri[metric] else "triton"
            winners.append((int(tri["tokens"]), layer, winner))
            parts.append(f"{winner} wins ({metric}: triton {tri[metric]:.3g}, dense {den[metric]:.3g})")
        plain, flex = by.get(("triton", False)), by.get(("flex", False))
        if plain and flex:
            m = "fwd+bwd ms" if plain.get("fwd+bwd ms") and flex.get("fwd+bwd ms") else "fwd ms"
            parts.append(f"FlexAttention takes {flex[m] / plain[m]:.2f}x the time of triton without rpb ({m}; "
                         f"{flex.get('note', '')})")
        if tri and plain and tri is not plain and tri.get("fwd+bwd ms") and plain.get("fwd+bwd ms"):
            parts.append(f"rpb costs {100 * (tri['fwd+bwd ms'] / plain['fwd+bwd ms'] - 1):.0f} % in fwd+bwd")
        if parts:
            lines.append(f"{layer}: " + "; ".join(parts))
    if not winners:
        lines.append("dispatch rule implied: none (no layer has both a triton and a dense timing)")
    else:
        dense_max = max((t for t, _, w in winners if w == "dense"), default=None)
        triton_min = min((t for t, _, w in winners if w == "triton"), default=None)
        if dense_max is None:
            lines.append("dispatch rule implied: triton for every layer measured")
        elif triton_min is None:
            lines.append("dispatch rule implied: dense for every layer measured")
        elif dense_max < triton_min:
            lines.append(f"dispatch rule implied: dense for maps of at most {dense_max} tokens, triton from "
                         f"{triton_min} tokens (threshold between {dense_max} and {triton_min})")
        else:
            lines.append("dispatch rule implied: no token threshold separates the winners: "
                         + ", ".join(f"{layer} -> {w}" for _, layer, w in sorted(winners)))
    return lines


# ------------------------------------------------------------------------------------------------------- driver


STEPS: dict[str, Callable[[Kit, dict[str, Any]], None]] = {
    "environment": step_environment, "correctness": step_correctness, "models": step_models, "ops": step_ops,
    "extra": step_extra,
}


def parse_steps(text: str | None) -> list[str]:
    """The steps to run, in the kit's order; the environment always runs."""
    if not text:
        return list(STEP_NAMES)
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STEP_NAMES]
    if unknown:
        raise ValueError(f"--steps: unknown step(s) {unknown}; choose from {', '.join(STEP_NAMES)}")
    return [s for s in STEP_NAMES if s in wanted or s == "environment"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the report (created; earlier reports are kept)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--steps", default=None, help=f"comma list from {','.join(STEP_NAMES)} (default: all)")
    parser.add_argument("--budget", type=float, default=None,
                        help="total seconds (default 500 on GPU); every step also has its own budget")
    parser.add_argument("--autotune", default="quick", choices=["full", "quick", "off"],
                        help="NATZOO_NA_AUTOTUNE for the timed steps (default quick: two configs per kernel)")
    args = parser.parse_args(argv)
    try:
        steps = parse_steps(args.steps)
    except ValueError as exc:
        parser.error(str(exc))

    # Before anything imports triton: the interpreter decision is taken when the kernels are decorated.
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ["NATZOO_NA_AUTOTUNE"] = args.autotune
    for path in (BENCHMARKS, ROOT):
        if path not in sys.path:
            sys.path.insert(0, path)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    plan = dry_plan() if args.dry_run else gpu_plan()
    meta = {"command": "python benchmarks/gpu_kit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run,
            "steps": steps, "budgets_s": plan.budgets}
    report = Report(args.out, meta)
    print(f"report: {report.md_path}", flush=True)
    kit = Kit(plan, report, args.budget)
    with counting_compiles(kit):
        for name in steps:
            if name == "precompile":
                kit.run(name, lambda k, s: step_precompile(k, s, steps))
            else:
                kit.run(name, STEPS[name])
    report.data["meta"]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    report.write()
    failed = [s["name"] for s in report.steps if s["status"] != "ok"]
    print(f"done: {report.md_path}" + (f"; failed steps: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
