"""GPU kit: checks and measures the fused NA kernels on one GPU in one call (at most 8 minutes on an H100, cold caches).

Usage::

    python3 benchmarks/gpu_kit.py --out $OUT/kit              # one GPU, cold Triton/Inductor caches included
    python3 benchmarks/gpu_kit.py --out $OUT/kit --steps ops,models
    python3 benchmarks/gpu_kit.py --dry-run --out /tmp/kit    # CPU, Triton interpreter, tiny shapes (CI)

Steps (``--steps`` picks a subset; the environment always runs):

1. ``environment``: GPU, driver, versions, ``TRITON_INTERPRET`` forced off (on in ``--dry-run``);
2. ``precompile``: every Triton kernel binary the selected steps will launch, compiled before anything is timed by
   worker processes on all CPU cores into the shared Triton cache (launches recorded by running the steps' own code
   with every Triton launch intercepted; each worker compiles through Triton's own JIT path for the parent's target),
   and the FlexAttention graphs of the flex step compiled by GPU worker processes, which are stopped in ``finally``;
3. ``correctness`` (in a child process; one that dies is reported with the item it was running, and a fresh one goes
   on): every entry of every kernel's search space forced one at a time in bf16, fp16 and fp32 against the float64
   reference, first at the NAT/DiNAT-Tiny layer problems; the gap checks (real map sizes and heads, frozen rpb, TF32,
   64-bit offsets, head_dim 256); the race check; then the other head-dim classes and ranks;
4. ``ops``: every NAT-Tiny/DiNAT-Tiny layer at batch 128: ``triton`` and ``dense`` with rpb, ``triton`` without, SDPA
   over all tokens; GPU time (back-to-back launches between two CUDA events, and the profiler's kernel time); then the
   dispatch rule the kernel times imply;
5. ``models``: ``nat_tiny``, Swin-T, ``dinat_tiny``, ConvNeXt-T, bf16 autocast, batch 128, channels-last;
6. ``endtoend``: NAT-T with the implied dispatch, forced ``triton`` and forced ``dense``; a logit check against the
   reference backend in float64;
7. ``profile``: the kernels of one NAT-T training step and the NA share;
8. ``autotune``: the autotuner's per-config times beside ``static_cost.py``'s modelled times;
9. ``flex``: compiled FlexAttention per layer, without rpb and with the rpb as a ``score_mod``, on its own budget;
10. ``extra``: head_dim 64 and 128 2-D rows and a 3-D row.

Every step has its own time budget and the run a total one; a row that would not fit is skipped and noted. The
report (``kit.json`` and ``kit.md``; ``kit-2.*``, ``kit-3.*``... when an earlier report is in ``--out``, which is
never overwritten) is rewritten after every row, so a run cut short keeps everything measured so far; a step that
raises is recorded and the next one runs. It needs torch, triton, timm and the repository (put on ``sys.path`` here;
no install, no Hydra, no pycocotools, no network). See docs/benchmarks.md for the expected time of every step.
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
import queue
import signal
import subprocess
import sys
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
STEP_NAMES = ("environment", "precompile", "correctness", "ops", "models", "endtoend", "profile", "autotune", "flex",
              "extra")
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
class GapCheck:
    """One forward+backward of the op at default (autotuned) configs against the float64 reference, for a case the
    search-space check does not reach: 16 heads, a frozen rpb, TF32, 64-bit offsets, head_dim 256, real map sizes."""

    name: str
    layer: Layer
    batch: int
    dtype: str = "bfloat16"
    rpb: str = "grad"  # "grad": the table requires grad; "frozen": present, no grad (no d_rpb); the layer's rpb=False
    tf32: bool = False  # float32 with TF32 products allowed (``set_float32_matmul_precision("high")``)
    wide: str = ""  # "forced": 64-bit offsets forced on a small problem; "real": a batch whose q spans >= 2**31
    tail: int = 0  # > 0: compare only the last `tail` batch items (the reference runs on those alone)


@dataclasses.dataclass(frozen=True)
class CheckItem:
    """One unit of the correctness step: a configcheck case, a gap check or the race check."""

    group: str
    name: str
    kind: str  # "case", "gap" or "race"
    payload: Any = None  # configcheck.Case, GapCheck or None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything that differs between the GPU run and the dry run; the code path is the same."""

    device: str
    check_batch: int  # shares binaries with timing_batch (Triton specialises ints on == 1 and % 16 only)
    check_groups: tuple[CheckGroup, ...]
    gap_checks: tuple[GapCheck, ...]
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
    e2e_model: str = "nat_tiny"  # the end-to-end, profile and logit checks
    e2e_kwargs: tuple[tuple[str, Any], ...] = ()  # timm.create_model keyword arguments (the dry run's tiny NAT)
    e2e_img: int = 224
    e2e_modes: tuple[str, ...] = ("infer", "train")  # bench_models modes of the end-to-end rows
    e2e_batch: int = 128
    logit_batch: int = 8
    autotune_layers: tuple[Layer, ...] = ()  # per-config autotuner times beside the static model
    autotune_kernels: tuple[str, ...] = ()  # static model: only these kernels (empty: all)
    profiler_repeats: int = 5  # calls per torch.profiler kernel-time measurement
    blocks: int = 3  # event-timed blocks of `repeats` back-to-back calls per row (median)


ALL_DTYPES = ("bfloat16", "float16", "float32")
WIDE_LAYER = Layer("7x7 h16, q spans >= 2**31 elements", (7, 7), 16, 32, (7, 7), (1, 1))


def wide_batch(layer: Layer) -> int:
    """The smallest batch at which q, a view of the fused qkv projection, spans more than 2**31 - 1 elements."""
    per_item = math.prod(layer.spatial) * 3 * layer.heads * layer.head_dim
    return (2**31 - 1) // per_item + 2


def gpu_gaps(batch: int) -> tuple[GapCheck, ...]:
    """The real NAT/DiNAT-Tiny layers (maps 56/28/14/7 with heads 2/4/8/16) and the cases configcheck leaves out."""
    real = tuple(GapCheck(f"real map: {layer.name}", layer, batch) for layer in nat_layers())
    hd256 = Layer("14x14 h2 hd256", (14, 14), 2, 256, (7, 7), (1, 1))
    return real + (
        GapCheck("dQ with a frozen rpb, 28x28 h4", nat_layers()[2], batch, rpb="frozen"),
        GapCheck("dQ with a frozen rpb, 7x7 h16", nat_layers()[-1], batch, rpb="frozen"),
        GapCheck("fp32 with TF32, 14x14 h8", nat_layers()[4], batch, "float32", tf32=True),
        GapCheck("int64 offsets forced, 14x14 h8 d2", nat_layers()[5], batch, wide="forced"),
        GapCheck("int64 offsets, q spans >= 2**31 elements", WIDE_LAYER, wide_batch(WIDE_LAYER), rpb="frozen",
                 wide="real", tail=2),
        GapCheck("head_dim 256 bf16, 14x14 h2", hd256, batch),
        GapCheck("head_dim 256 fp16, 14x14 h2, frozen rpb", hd256, batch, "float16", rpb="frozen"),
    )


# Seconds per step on the GPU (docs/benchmarks.md has the estimate behind every figure); the total is the cap.
GPU_BUDGETS = {"environment": 15, "precompile": 150, "correctness": 70, "ops": 50, "models": 50, "endtoend": 30,
               "profile": 10, "autotune": 25, "flex": 40, "extra": 20}
GPU_TOTAL_BUDGET = 460.0


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
        gap_checks=gpu_gaps(16), race_layer=layers[1], race_runs=20, deterministic_runs=3,
        models=("nat_tiny", "swin_tiny_patch4_window7_224", "dinat_tiny", "convnext_tiny"), model_batch=128,
        model_dtype="bf16", model_warmup=3, model_iters=10,
        timing_batch=128, timing_layers=tuple(layers),
        extra_layers=((Layer("2d 64x64 k13 hd64", (64, 64), 8, 64, (13, 13), (1, 1), rpb=False), 8),
                      (Layer("2d 64x64 k13 hd128", (64, 64), 8, 128, (13, 13), (1, 1), rpb=False), 8),
                      (Layer("3d 16x32x32 k3x7x7 hd64", (16, 32, 32), 8, 64, (3, 7, 7), (1, 1, 1), rpb=False), 1)),
        warmup=5, repeats=20, compile_flex=True,
        budgets=dict(GPU_BUDGETS), total_budget=GPU_TOTAL_BUDGET, compile_limit=None, flex_workers=True,
        row_reserve={"case": 0.5, "model": 15, "op": 2, "flex": 8, "flex-cold": 45, "e2e": 10, "autotune": 5},
        autotune_layers=tuple(layer for layer in layers if layer.dilation == (1, 1)),
    )


def dry_plan() -> Plan:
    tiny = (Layer("tiny 8x8 h1", (8, 8), 1, 16, (3, 3), (1, 1)), Layer("tiny 8x8 h1 d2", (8, 8), 1, 16, (3, 3), (2, 2)))
    return Plan(
        device="cpu", check_batch=1,
        check_groups=(CheckGroup("tiny 2-D, first entries", (2,), ALL_DTYPES, (16,), tiny[1], sample=True),),
        gap_checks=(GapCheck("tiny 6x6 h2", Layer("tiny 6x6 h2", (6, 6), 2, 16, (3, 3), (1, 1)), 1),
                    GapCheck("tiny frozen rpb fp16", tiny[0], 1, "float16", rpb="frozen"),
                    GapCheck("tiny fp32 TF32", tiny[1], 1, "float32", tf32=True),
                    GapCheck("tiny int64 offsets forced", tiny[1], 1, wide="forced")),
        race_layer=tiny[0], race_runs=2, deterministic_runs=2,
        models=("nat_tiny", "swin_tiny_patch4_window7_224"), model_batch=1, model_dtype=None, model_warmup=0,
        model_iters=1,
        timing_batch=1, timing_layers=tiny[1:],
        extra_layers=((Layer("tiny 3d 4x4x4 k3", (4, 4, 4), 1, 16, (3, 3, 3), (1, 1, 1), rpb=False), 1),),
        warmup=0, repeats=1, compile_flex=False,
        # Generous: the dry run checks code paths on shared CI machines, where a budget skip would hide one.
        budgets=dict.fromkeys(STEP_NAMES, 1200.0), total_budget=3600, compile_limit=1, flex_workers=True,
        row_reserve={"case": 0.0, "model": 0.0, "op": 0.0, "flex": 0.0, "flex-cold": 0.0, "e2e": 0.0, "autotune": 0.0},
        # A three-level NAT with one block per level at 48 px (maps 12/6/3): the interpreter runs forced triton.
        e2e_kwargs=(("depths", (1, 1, 1)), ("num_heads", (1, 1, 1)), ("embed_dim", 16), ("kernel_size", 3)),
        e2e_img=48, e2e_batch=1, e2e_modes=("infer",), logit_batch=1, autotune_layers=tiny[:1],
        autotune_kernels=("na_fwd",), profiler_repeats=1, blocks=1,
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
        self.versions = str(meta.get("versions", ""))  # "torch X, Triton Y": beside every step's numbers
        self.write()

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.data["steps"]

    def step(self, name: str) -> dict[str, Any]:
        step: dict[str, Any] = {"name": name, "status": "running", "seconds": None, "budget_s": None,
                                "versions": self.versions, "rows": [], "notes": [], "error": None}
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
            versions = f"; {step['versions']}" if step.get("versions") else ""
            lines += [f"## {step['name']} ({step['status']}{seconds}{budget}{versions})", ""]
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
        self.implied: dict[tuple[Any, ...], str] = {}  # (map, dilation, heads) -> backend the op step's GPU times pick
        self.flex_warm: set[tuple[str, bool]] = set()  # (layer, rpb) FlexAttention graphs the precompile step built

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
def counting_compiles(sink: list[dict[str, Any]]) -> Iterator[None]:
    """Appends to `sink` every Triton compilation of an NA kernel in this process that missed the on-disk cache."""
    from natzoo.ops.neighborhood.triton import compat

    def listener(**event: Any) -> None:
        if event.get("cache_hit", True):
            return
        try:  # other compilations (Inductor's kernels, IR sources) are not ours to count
            key = _kernel_key(event["src"].fn)
        except (AttributeError, KeyError, TypeError):
            return
        if key.startswith(NA_KERNELS):
            sink.append({"kernel": key.rsplit(":", 1)[-1], "seconds": _total_seconds(event.get("times"))})

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
    items = check_items(kit.plan)
    split = next(i for i, item in enumerate(items) if item.kind == "race") + 1
    core, rest = items[:split], items[split:]  # the timed layers' groups, the gap checks and the race check first
    workloads: list[tuple[str, Callable[[Kit, list[CompileSpec]], None]]] = [
        ("correctness", lambda k, sink: correctness_workload(k, sink, core)),
        ("ops", ops_workload), ("models", models_workload), ("endtoend", models_workload),
        ("extra", extra_workload), ("correctness", lambda k, sink: correctness_workload(k, sink, rest)),
    ]
    done: set[Callable[[Kit, list[CompileSpec]], None]] = set()
    for name, workload in workloads:
        if name in steps and workload not in done:
            done.add(workload)
            sink: list[CompileSpec] = []
            workload(kit, sink)
            yield [spec for spec in sink if spec.kernel.startswith(NA_KERNELS)]


def step_precompile(kit: Kit, step: dict[str, Any], steps: list[str]) -> None:
    import torch

    plan = kit.plan
    start = time.perf_counter()
    flex = _flex_jobs(plan, steps) if plan.flex_workers else []
    warmers = None
    if flex:
        # GPU workers compile the FlexAttention graphs into Inductor's caches while the CPU workers build Triton's;
        # one Inductor compile thread each (one process per graph already).
        warmers = BackgroundJobs(warm_flex, flex, min(len(flex), 8), sys.path[:],
                                 {"TORCHINDUCTOR_COMPILE_THREADS": "1"})
    try:
        _precompile_triton(kit, step, steps, start)
        if warmers is not None:
            results = warmers.collect(kit.left())
            for index, job in enumerate(flex):
                result = dict(results.get(index) or {"error": "not finished within the precompile budget: stopped; "
                                                               "the flex step compiles it"})
                result.pop("layer", None)
                if result.get("error") is None:
                    kit.flex_warm.add((job[0].name, job[3]))
                kit.report.add(step, {"kernel": f"FlexAttention {job[0].name}" + (" rpb" if job[3] else ""),
                                      **result})
    finally:
        if warmers is not None:
            stopped = warmers.stop()  # none may share the GPU with a timed step
            if stopped:
                kit.report.note(step, f"stopped {len(stopped)} unfinished FlexAttention warm-up process(es)")
    kit.report.note(step, f"compile time on its own: {time.perf_counter() - start:.1f} s wall; later steps list any "
                          "NA binary they still had to compile")
    if plan.device == "cuda":
        torch.cuda.empty_cache()


def _precompile_triton(kit: Kit, step: dict[str, Any], steps: list[str], start: float) -> None:
    """The Triton part of the precompile step: captured launches built by worker processes on every CPU core."""
    plan = kit.plan
    ctx = multiprocessing.get_context("spawn")
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


def _collect(kit: Kit, step: dict[str, Any],
             futures: dict[concurrent.futures.Future[dict[str, Any]], CompileSpec]) -> list[dict[str, Any]]:
    results = []
    try:
        for future in concurrent.futures.as_completed(futures, timeout=max(1.0, kit.left())):
            spec = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker that cannot start or dies fails its binary, not the step
                result = {"kernel": spec.name, "seconds": 0.0, "cpu_s": 0.0, "cache_hit": False,
                          "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            result["source"] = spec.source
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


def _flex_jobs(plan: Plan, steps: list[str]) -> list[tuple[Layer, int, bool, bool]]:
    """(layer, batch, compiled, rpb as score_mod) of every FlexAttention row of the flex step (the dry run: one)."""
    jobs: list[tuple[Layer, int, bool, bool]] = []
    if "flex" in steps:
        jobs += [(layer, plan.timing_batch, plan.compile_flex, rpb) for layer in plan.timing_layers
                 for rpb in ((False, True) if layer.rpb else (False,))]
    return jobs if plan.device == "cuda" else jobs[:1]


def _add_paths(paths: list[str]) -> None:
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)


class BackgroundJobs:
    """``fn(*job)`` for every job in at most `workers` spawned processes; :meth:`stop` ends them, finished or not.

    The precompile step's FlexAttention warm-ups hold the GPU: the step calls :meth:`stop` in ``finally``, so none
    runs into a timed step, whether the step ends normally, runs out of budget or raises.
    """

    def __init__(self, fn: Callable[..., dict[str, Any]], jobs: list[tuple[Any, ...]], workers: int,
                 paths: list[str], env: dict[str, str] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.jobs = list(jobs)
        self.done: dict[int, dict[str, Any]] = {}
        self.tasks: Any = ctx.Queue()
        self.results: Any = ctx.Queue()
        count = max(1, min(workers, len(self.jobs)))
        for index, job in enumerate(self.jobs):
            self.tasks.put((index, job))
        for _ in range(count):
            self.tasks.put(None)
        self.processes = [ctx.Process(target=_job_worker, args=(fn, self.tasks, self.results, paths, env or {}),
                                      daemon=True) for _ in range(count)]
        for process in self.processes:
            process.start()

    def collect(self, timeout: float) -> dict[int, dict[str, Any]]:
        """Results by job index, waiting at most `timeout` seconds for the unfinished ones."""
        deadline = time.monotonic() + timeout
        while len(self.done) < len(self.jobs):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                index, result = self.results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if not any(p.is_alive() for p in self.processes):
                    break
                continue
            self.done[index] = result
        return self.done

    def stop(self) -> list[int]:
        """Terminates (SIGTERM, then SIGKILL after 5 s) every worker still alive and waits for it to end; returns
        the indices of the jobs that did not report a result."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for q in (self.tasks, self.results):
            q.cancel_join_thread()
            q.close()
        return [index for index in range(len(self.jobs)) if index not in self.done]


def _job_worker(fn: Callable[..., dict[str, Any]], tasks: Any, results: Any, paths: list[str],
                env: dict[str, str]) -> None:
    os.environ.update(env)
    _add_paths(paths)
    while True:
        item = tasks.get()
        if item is None:
            return
        index, job = item
        try:
            result = fn(*job)
        except Exception as exc:  # noqa: BLE001 - a warm-up failure leaves the compile to the flex step
            result = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        results.put((index, result))


def warm_flex(layer: Layer, batch: int, compile_flex: bool, with_rpb: bool = False) -> dict[str, Any]:
    """Runs one FlexAttention forward (+ backward on CUDA) of `layer` as the flex step does, filling the caches."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    fwd, leaves = flex_fn(layer, batch, dtype, device, compile_flex, with_rpb)
    with torch.no_grad():
        fwd()  # the flex rows time a no-grad forward (its own graph) and a forward+backward
    if leaves:
        out = fwd()
        torch.autograd.grad(out, leaves, torch.ones_like(out))
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
                     dtype: Any = None, rpb_grad: bool = True) -> tuple[Any, Any, list[Any]]:
    """out, lse and the gradients of ``<out, dO> + <lse, dLSE>`` w.r.t. q, k, v (and rpb unless it is frozen)."""
    import torch

    from natzoo import ops

    dtype = dtype or q.dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    bias = None
    if rpb is not None:
        bias = rpb.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(rpb_grad)
    fn = getattr(ops, f"na{len(layer.spatial)}d")
    out, lse = fn(*leaves, layer.kernel, dilation=layer.dilation, rpb=bias, return_lse=True, backend=backend)
    loss = (out.double() * grad_out.double()).sum() + (lse.double() * grad_lse.double()).sum()
    grads = torch.autograd.grad(loss, leaves + ([bias] if bias is not None and rpb_grad else []))
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


def check_items(plan: Plan) -> list[CheckItem]:
    """The correctness step's units in priority order: the timed layers' configcheck groups, the gap checks, the race
    check, then the other configcheck groups."""
    cases = check_cases(plan)
    core = [CheckItem(g.label, c.name, "case", c) for g, c in cases if g.layer is not None]
    rest = [CheckItem(g.label, c.name, "case", c) for g, c in cases if g.layer is None]
    gaps = [CheckItem("gaps: default configs vs float64", gap.name, "gap", gap) for gap in plan.gap_checks]
    race = CheckItem(f"race: {plan.race_runs} fwd+bwd runs", plan.race_layer.name, "race")
    return core + gaps + [race] + rest


def run_item(item: CheckItem, plan: Plan) -> dict[str, Any]:
    """One correctness unit's row (``passed`` and ``error`` always present)."""
    import torch
    from natzoo.ops.neighborhood.triton import configcheck

    torch.set_float32_matmul_precision("highest")  # fp32 checked with IEEE products (a gap check may allow TF32)

    if item.kind == "case":
        return configcheck.run_case(item.payload, plan.device)
    if item.kind == "gap":
        return run_gap(item.payload, plan.device)
    return race_row(plan)


def correctness_workload(kit: Kit, sink: list[CompileSpec], items: list[CheckItem]) -> None:
    plan = dataclasses.replace(kit.plan, race_runs=1, deterministic_runs=1)
    for item in items:
        with recording(sink, f"check: {item.group}"):
            run_item(item, plan)


@contextlib.contextmanager
def gap_context(gap: GapCheck) -> Iterator[None]:
    """TF32 allowed for `gap.tf32`; 64-bit offsets forced for ``wide="forced"`` (the launchers' int32 test answers
    no, so the kernels take their int64 path on a small problem)."""
    import torch
    from natzoo.ops.neighborhood.triton import backward, forward

    with contextlib.ExitStack() as stack:
        if gap.tf32:
            torch.set_float32_matmul_precision("high")
            stack.callback(torch.set_float32_matmul_precision, "highest")  # the correctness step's setting
        if gap.wide == "forced":
            originals = (forward.narrow_offsets, backward.narrow_offsets)

            def wide(*tensors: Any) -> bool:
                return False

            forward.narrow_offsets = backward.narrow_offsets = wide
            stack.callback(setattr, forward, "narrow_offsets", originals[0])
            stack.callback(setattr, backward, "narrow_offsets", originals[1])
        yield


def run_gap(gap: GapCheck, device: str) -> dict[str, Any]:
    """Forward+backward of `gap` with the Triton backend against the reference backend in float64 (on the last
    `gap.tail` batch items when set), with configcheck's tolerances for the dtype and fp32 precision."""
    import torch
    from natzoo.ops.neighborhood.triton import configcheck, forward

    layer, dtype = gap.layer, getattr(torch, gap.dtype)
    rpb_grad = gap.rpb == "grad"
    row: dict[str, Any] = {"name": gap.name, "dtype": gap.dtype, "shape": f"B{gap.batch} {layer.spatial} "
                           f"H{layer.heads} D{layer.head_dim} k{layer.kernel} d{layer.dilation}",
                           "rpb": gap.rpb if layer.rpb else "none"}
    start = time.perf_counter()
    q, k, v, rpb, grad_out, grad_lse = layer_inputs(layer, gap.batch, dtype, device, seed=2)
    try:
        with gap_context(gap):
            precision = forward.dot_precision(dtype)
            wide = not forward.narrow_offsets(q, k, v)
            got = forward_backward(layer, q, k, v, rpb, grad_out, grad_lse, "triton", rpb_grad=rpb_grad)
            if device == "cuda":
                torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a compile or launch failure is this check's result
        row.update(passed=False, error=f"{type(exc).__name__}: {str(exc)[:300]}", seconds=time.perf_counter() - start)
        return row
    row.update(precision=precision if dtype == torch.float32 else "-", int64_offsets=wide)
    part = slice(-gap.tail, None) if gap.tail else slice(None)
    want = forward_backward(layer, q[part], k[part], v[part], rpb, grad_out[part], grad_lse[part], "reference",
                            torch.float64, rpb_grad=rpb_grad and not gap.tail)
    tol_out, tol_grad, tol_rpb = configcheck.TOLERANCE[precision if dtype == torch.float32 else dtype]
    names = ["out", "lse", "dq", "dk", "dv", "d_rpb"]
    got_all = [got[0][part], got[1][part], *(g[part] for g in got[2][:3]), *got[2][3:4]][:len(want[2]) + 2]
    passed = True
    for name, g, w in zip(names, got_all, [want[0], want[1], *want[2]]):
        g, w = g.double(), w.double()
        finite = bool(torch.isfinite(g).all())
        diff = (g - w).abs()
        row[f"{name}_max_abs"] = diff.max().item() if finite else math.inf
        if name == "d_rpb":
            rel = ((g - w).norm() / w.norm().clamp_min(1e-30)).item() if finite else math.inf
            row["d_rpb_rel_l2"] = rel
            passed &= rel <= tol_rpb
        else:
            tol = tol_out if name in ("out", "lse") else tol_grad
            passed &= finite and bool((diff <= tol + tol * w.abs()).all())
    if gap.wide and not wide:
        passed, row["error"] = False, "the problem did not take the int64-offset path"
    row.update(passed=passed, error=row.get("error"), seconds=time.perf_counter() - start)
    return row


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _check_child(conn: Any, items: list[CheckItem], plan: Plan, skip: set[str], start: int,
                 runner: Callable[[CheckItem, Plan], dict[str, Any]]) -> None:
    """The correctness step's child process: runs `items[start:]` (except the groups in `skip`) and sends
    ``("start", i)`` before and ``("row", i, row, compiles)`` after each, then ``("done",)``."""
    compiles: list[dict[str, Any]] = []
    with counting_compiles(compiles):
        for index in range(start, len(items)):
            if items[index].group in skip:
                continue
            conn.send(("start", index))
            row = runner(items[index], plan)
            conn.send(("row", index, row, compiles[:]))
            compiles.clear()
    conn.send(("done",))
    conn.close()


def run_checks(kit: Kit, step: dict[str, Any], items: list[CheckItem], skip: set[str],
               runner: Callable[[CheckItem, Plan], dict[str, Any]] | None = None,
               max_faults: int = 5) -> dict[int, dict[str, Any]]:
    """Runs `items` in a spawned child process, reporting each row as it arrives.

    A child that dies (an illegal memory access poisons a CUDA context for good; a crash in a compiler) is recorded
    as a failed row naming the item it was running, and a fresh child goes on from the next item, at most
    `max_faults` times. A child still running when the budget is spent is stopped. Returns the rows by item index.
    """
    ctx = multiprocessing.get_context("spawn")
    runner = runner or run_item
    rows: dict[int, dict[str, Any]] = {}
    start, faults = 0, 0
    while start < len(items):
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_check_child, args=(sender, items, kit.plan, skip, start, runner), daemon=True)
        child.start()
        sender.close()
        current: int | None = None
        finished = False
        try:
            while True:
                if kit.left() < kit.plan.row_reserve["case"]:
                    kit.report.note(step, "correctness budget spent: the check process was stopped"
                                    + (f" while running {items[current].name!r}" if current is not None else ""))
                    return rows
                if not receiver.poll(min(1.0, max(0.05, kit.left()))):
                    continue
                try:
                    message = receiver.recv()
                except EOFError:  # the child is gone without saying done
                    break
                if message[0] == "start":
                    current = message[1]
                elif message[0] == "row":
                    current = None
                    rows[message[1]] = message[2]
                    kit.compiles.extend(message[3])
                    kit.report.add(step, {"group": items[message[1]].group, **message[2]})
                else:
                    finished = True
                    break
        finally:
            receiver.close()
            if child.is_alive() and not finished:
                child.kill()
            child.join(10)
        if finished:
            break
        faults += 1
        where = current if current is not None else start
        what = _exit_text(child.exitcode)
        row = {"name": items[where].name, "passed": False,
               "error": f"FAULT: the check process died ({what}) while running this item; the items after it ran in a "
                        "fresh process"}
        rows[where] = row
        kit.report.add(step, {"group": items[where].group, **row})
        kit.report.note(step, f"check process {what} while running {items[where].group} / {items[where].name}")
        if faults >= max_faults:
            kit.report.note(step, f"{faults} check processes died: the remaining items were not run")
            break
        start = where + 1
    return rows


def step_correctness(kit: Kit, step: dict[str, Any]) -> None:
    import torch

    items = check_items(kit.plan)
    skip = set(kit.uncovered or ())
    if kit.plan.device == "cuda":
        torch.cuda.empty_cache()  # the child needs the memory (the 64-bit offset check holds tens of GiB)
    rows = run_checks(kit, step, items, skip)
    summary: dict[str, dict[str, Any]] = {}
    for index, item in enumerate(items):
        counts = summary.setdefault(item.group, {"group": item.group, "cases": 0, "passed": 0, "failed": 0,
                                                 "not run": 0})
        counts["cases"] += 1
        row = rows.get(index)
        counts["not run" if row is None else "passed" if row.get("passed") else "failed"] += 1
    for counts in summary.values():
        why = " (precompile budget)" if counts["group"] in skip else " (budget)" if counts["not run"] else ""
        kit.report.note(step, "{group}: {cases} items, {passed} passed, {failed} failed, {not run} not run".format(
            **counts) + why)
    kit.report.note(step, "every entry of every kernel's search space forced one at a time against the float64 "
                          f"reference (configcheck; check batch {kit.plan.check_batch} shares the timed batch's "
                          "binaries); gap checks at default configs; all in a child process")
    failures = sum(not row.get("passed") for row in rows.values())
    if failures:
        raise AssertionError(f"{failures} correctness check(s) failed (see the rows)")


def race_row(plan: Plan) -> dict[str, Any]:
    """Repeated forward+backward: out, lse, dq, dk, dv bit-identical; d_rpb bounded (atomic) / identical."""
    import torch

    layer = plan.race_layer
    runs, det_runs = plan.race_runs, plan.deterministic_runs
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
    det_equal = all(torch.equal(det[0], d) for d in det[1:])
    ok = mismatches == 0 and drift <= 1e-5 and det_equal
    return {"name": layer.name, "dtype": "bfloat16", "bitwise mismatches (out, lse, dq, dk, dv)": mismatches,
            "atomic d_rpb max rel drift": drift, "deterministic d_rpb identical": det_equal, "passed": ok,
            "error": None}


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
                                  "ms/batch": r["seconds"] * 1e3, _peak_label(plan): r["peak_mib"],
                                  "params M": r["params"]})
    swin = {r["mode"]: r["img/s"] for r in step["rows"] if r["model"].startswith("swin") and "img/s" in r}
    for row in step["rows"]:
        if "img/s" in row and row["mode"] in swin:
            row["x Swin-T"] = row["img/s"] / swin[row["mode"]]
    kit.report.note(step, f"{plan.model_dtype or 'fp32'} autocast, channels-last={plan.device == 'cuda'}, "
                          f"{plan.model_warmup} warm-up + median of {plan.model_iters} iterations; train step = "
                          "forward, cross-entropy, backward, AdamW step")
    kit.report.write()


# ----------------------------------------------------------------------------------------------- op timing


def useful_scores(layer: Layer, batch: int) -> int:
    """batch * heads * sum over queries of the neighbourhood size (non-causal windows hold exactly k keys)."""
    return batch * layer.heads * math.prod(layer.spatial) * math.prod(layer.kernel)


def providers(layer: Layer, flex: bool = False) -> list[tuple[str, bool]]:
    """(provider, rpb) rows per layer: the NA backends with the layer's rpb, Triton without, SDPA over all tokens;
    with `flex`, FlexAttention without and with the rpb as a ``score_mod`` instead."""
    if flex:
        return [("flex", False)] + ([("flex", True)] if layer.rpb else [])
    rows = [("triton", layer.rpb), ("dense", layer.rpb)]
    if layer.rpb:
        rows.append(("triton", False))
    return rows + [("sdpa-full", False)]


def flex_fn(layer: Layer, batch: int, dtype: Any, device: str, compile_flex: bool,
            with_rpb: bool = False) -> tuple[Callable[[], Any], list[Any]]:
    """(FlexAttention forward with the NA block mask on fresh fused-qkv inputs, the tensors its backward
    differentiates: q, k, v and, `with_rpb`, the rpb table of the ``score_mod``; none on CPU, where FlexAttention has
    no backward). Shared by the flex rows and the precompile workers, so both build the same graph."""
    import torch
    from bench_op import Shape, na_mask_mod, na_score_mod
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    backward = device == "cuda"
    q, k, v, rpb, _, _ = layer_inputs(layer, batch, dtype, device)
    tokens = math.prod(layer.spatial)
    flat = [(t.detach().requires_grad_() if backward else t.detach()).reshape(batch, tokens, layer.heads,
                                                                              layer.head_dim).transpose(1, 2)
            for t in (q, k, v)]
    shape = Shape(layer.name, batch, layer.spatial, layer.heads, layer.head_dim, layer.kernel, layer.dilation)
    block_mask = create_block_mask(na_mask_mod(shape), None, None, tokens, tokens, device=device)
    table = rpb.detach().requires_grad_(backward) if with_rpb and rpb is not None else None
    score_mod = na_score_mod(shape, table) if table is not None else None
    torch._dynamo.reset()  # a fresh compile per shape: no silent eager fallback after the recompile limit
    if compile_flex:
        flex = torch.compile(flex_attention)
    else:
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        flex = flex_attention

    def fwd() -> Any:
        return flex(flat[0], flat[1], flat[2], score_mod=score_mod, block_mask=block_mask)

    leaves = (flat + ([table] if table is not None else [])) if backward else []
    return fwd, leaves


def time_provider(layer: Layer, batch: int, provider: str, with_rpb: bool, dtype: Any, plan: Plan,
                  bandwidth: float | None) -> dict[str, Any]:
    """One op row: forward and forward+backward milliseconds (CUDA events around back-to-back launches, and the
    profiler's kernel time), useful TFLOP/s, peak memory above what was allocated before the row."""
    import torch
    from bench_op import compiled_graphs, kernel_ms, time_ms

    from natzoo import ops

    cuda = plan.device == "cuda"
    base = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    n, tokens, note, graphs = len(layer.spatial), math.prod(layer.spatial), "", 0
    if provider in ("triton", "dense"):
        q, k, v, rpb, _, _ = layer_inputs(layer, batch, dtype, plan.device)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        rpb = rpb.requires_grad_() if with_rpb and rpb is not None else None
        leaves = [t for t in (q, k, v, rpb) if t is not None]
        fn = getattr(ops, f"na{n}d")

        def fwd() -> Any:
            return fn(q, k, v, layer.kernel, dilation=layer.dilation, rpb=rpb, backend=provider)

    elif provider == "flex":
        graphs = compiled_graphs()
        fwd, leaves = flex_fn(layer, batch, dtype, plan.device, plan.compile_flex, with_rpb)
    else:
        q, k, v, _, _, _ = layer_inputs(layer, batch, dtype, plan.device)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        flat = [t.reshape(batch, tokens, layer.heads, layer.head_dim).transpose(1, 2) for t in leaves]
        note = "all N^2 scores"

        def fwd() -> Any:
            return torch.nn.functional.scaled_dot_product_attention(*flat)

    grad: list[Any] = []

    def fwdbwd() -> Any:
        out = fwd()
        if not grad:
            grad.append(torch.randn_like(out))
        # Gradients returned, not accumulated into .grad: back-to-back repeats add no accumulation kernels.
        return torch.autograd.grad(out, leaves, grad[0])

    first = time.perf_counter()
    with torch.no_grad():
        fwd()  # the first call compiles (FlexAttention) or loads (Triton) what the timed calls run
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - first
    with torch.no_grad():
        fwd_ms = time_ms(fwd, plan.device, plan.warmup, plan.repeats, plan.blocks)
        fwd_kernel = kernel_ms(fwd, plan.device, plan.profiler_repeats)
    fwdbwd_ms = fwdbwd_kernel = None
    if leaves:
        fwdbwd_ms = time_ms(fwdbwd, plan.device, plan.warmup, plan.repeats, plan.blocks)
        fwdbwd_kernel = kernel_ms(fwdbwd, plan.device, plan.profiler_repeats)
    if provider == "flex":
        made = compiled_graphs() - graphs
        if not plan.compile_flex:
            note = "eager, forward only (dry run)"
        else:
            note = f"compiled ({made} graphs after dynamo reset)" if made else "EAGER: no graph compiled"
        note += "; rpb as score_mod (table requires grad)" if with_rpb else "; no rpb"
    flops = 4.0 * useful_scores(layer, batch) * layer.head_dim
    fwd_gpu = fwd_kernel or fwd_ms
    both_gpu = fwdbwd_kernel or fwdbwd_ms
    row: dict[str, Any] = {"fwd ms": fwd_ms, "fwd kernel ms": fwd_kernel, "fwd+bwd ms": fwdbwd_ms,
                           "fwd+bwd kernel ms": fwdbwd_kernel, "first call s": first_s,
                           "fwd useful TFLOP/s": flops / (fwd_gpu * 1e-3) / 1e12,
                           "fwd+bwd useful TFLOP/s": 3.5 * flops / (both_gpu * 1e-3) / 1e12 if both_gpu else None}
    if bandwidth is not None:
        moved = 4 * batch * tokens * layer.heads * layer.head_dim * dtype.itemsize  # q, k, v read, out written once
        row["fwd % of bandwidth floor"] = 100.0 * moved / bandwidth / (fwd_gpu * 1e-3)
    if cuda:
        row["peak MiB above start"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    row["note"] = note
    return row


def _timing_dtype(plan: Plan) -> Any:
    import torch

    return torch.bfloat16 if plan.device == "cuda" else torch.float32


def _capture_rows(kit: Kit, sink: list[CompileSpec], rows: list[tuple[Layer, int]], source: str) -> None:
    """Records the Triton launches of the `triton` rows of `rows` (one forward and one forward+backward each)."""
    plan = dataclasses.replace(kit.plan, warmup=0, repeats=1, profiler_repeats=0, blocks=1)
    for layer, batch in rows:
        for provider, with_rpb in providers(layer):
            if provider == "triton":
                with recording(sink, f"{source} {layer.name}"):
                    time_provider(layer, batch, provider, with_rpb, _timing_dtype(plan), plan, None)


def ops_workload(kit: Kit, sink: list[CompileSpec]) -> None:
    _capture_rows(kit, sink, [(layer, kit.plan.timing_batch) for layer in kit.plan.timing_layers], "ops")


def extra_workload(kit: Kit, sink: list[CompileSpec]) -> None:
    _capture_rows(kit, sink, list(kit.plan.extra_layers), "extra")


def time_rows(kit: Kit, step: dict[str, Any], rows: list[tuple[Layer, int]], flex: bool = False) -> None:
    """Every provider row of every layer of `rows` (the flex providers with `flex`), each within the budget."""
    import torch
    from bench_op import device_limits

    plan = kit.plan
    dtype = _timing_dtype(plan)
    bandwidth, peak = device_limits(plan.device, dtype)
    if bandwidth is not None and peak is not None:
        kit.report.note(step, f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s, {dtype} matmul peak "
                              f"{peak / 1e12:.0f} TFLOP/s (8192^3) on this device")
    for layer, batch in rows:
        for provider, with_rpb in providers(layer, flex):
            # A FlexAttention graph the precompile step did not build compiles cold here (tens of seconds).
            cold = flex and (layer.name, with_rpb) not in kit.flex_warm
            reserve = plan.row_reserve["flex-cold" if cold else "flex" if flex else "op"]
            if kit.left() < reserve:
                kit.report.note(step, f"{layer.name} {provider}{' rpb' if with_rpb else ''}: skipped (time budget)")
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
    kit.report.note(step, f"ms: {plan.repeats} calls back to back between two CUDA events, median of {plan.blocks} "
                          "blocks (host launch overhead included where it exceeds the GPU's work); kernel ms: summed "
                          f"GPU kernel time per call from torch.profiler over {plan.profiler_repeats} calls")


def step_ops(kit: Kit, step: dict[str, Any]) -> None:
    time_rows(kit, step, [(layer, kit.plan.timing_batch) for layer in kit.plan.timing_layers])
    for line in dispatch_rule(step["rows"]):
        kit.report.note(step, line)
    names = {layer.name: layer for layer in kit.plan.timing_layers}
    kit.implied = {(names[name].spatial, names[name].dilation, names[name].heads): winner
                   for name, winner in layer_winners(step["rows"]).items() if name in names}


def step_flex(kit: Kit, step: dict[str, Any]) -> None:
    time_rows(kit, step, [(layer, kit.plan.timing_batch) for layer in kit.plan.timing_layers], flex=True)


def step_extra(kit: Kit, step: dict[str, Any]) -> None:
    time_rows(kit, step, list(kit.plan.extra_layers))
    for line in dispatch_rule(step["rows"]):
        kit.report.note(step, line)


GPU_METRICS = ("fwd+bwd kernel ms", "fwd+bwd ms", "fwd kernel ms", "fwd ms")  # preference order


def _metric(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first of `GPU_METRICS` both rows have: GPU kernel time first, so the rule rests on the GPU's work."""
    return next((m for m in GPU_METRICS if a.get(m) and b.get(m)), None)


def layer_winners(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per layer with both timings, the faster of ``triton`` and ``dense`` (with the layer's rpb) by GPU time."""
    winners = {}
    for layer in dict.fromkeys(r["layer"] for r in rows):
        by = {(r["provider"], r["rpb"]): r for r in rows if r["layer"] == layer}
        rpb = any(r["rpb"] for r in rows if r["layer"] == layer)
        tri, den = by.get(("triton", rpb)), by.get(("dense", rpb))
        metric = _metric(tri, den) if tri and den else None
        if tri and den and metric:
            winners[layer] = "dense" if den[metric] < tri[metric] else "triton"
    return winners


def dispatch_rule(rows: list[dict[str, Any]]) -> list[str]:
    """The backend choice the GPU times imply: per layer the faster of triton and dense (profiler kernel time of
    fwd+bwd first, see `GPU_METRICS`), then the token threshold below which dense wins everywhere, if one exists;
    FlexAttention against triton without rpb."""
    lines = []
    winners: list[tuple[int, str, str]] = []
    for layer, winner in layer_winners(rows).items():
        by = {(r["provider"], r["rpb"]): r for r in rows if r["layer"] == layer}
        rpb = any(r["rpb"] for r in rows if r["layer"] == layer)
        tri, den = by[("triton", rpb)], by[("dense", rpb)]
        metric = _metric(tri, den) or ""
        winners.append((int(tri["tokens"]), layer, winner))
        parts = [f"{winner} wins ({metric}: triton {tri[metric]:.3g}, dense {den[metric]:.3g})"]
        plain = by.get(("triton", False))
        if plain is not None and plain is not tri:
            m = _metric(tri, plain)
            if m and m.startswith("fwd+bwd"):
                parts.append(f"rpb costs {100 * (tri[m] / plain[m] - 1):.0f} % in {m}")
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


# ------------------------------------------------------------------------------ NAT-T end to end, profile, autotune


@contextlib.contextmanager
def implied_dispatch(choices: dict[tuple[Any, ...], str]) -> Iterator[None]:
    """Automatic dispatch replaced by the op step's per-layer winners, keyed by (map, dilation, heads); other
    problems, an explicit backend, ``use_backend`` and attention dropout keep the library's choice."""
    from natzoo.ops.neighborhood import dispatch, functional

    original = functional.select_backend

    def select(problem: Any, backend: str | None, *args: Any, **kwargs: Any) -> str:
        choice = choices.get((tuple(problem.spatial), tuple(problem.dilation), problem.heads))
        dropout = args[2] if len(args) > 2 else kwargs.get("dropout_p", 0.0)
        if choice is None or backend not in (None, "auto") or dispatch.forced_backend() is not None or dropout:
            return original(problem, backend, *args, **kwargs)
        return choice

    functional.select_backend = select
    try:
        yield
    finally:
        functional.select_backend = original


def _peak_label(plan: Plan) -> str:
    """bench_models' memory column: CUDA allocations above the row's start; on the CPU the process's peak RSS."""
    return "peak MiB above start" if plan.device == "cuda" else "peak RSS MiB"


def _model_kwargs(plan: Plan) -> dict[str, Any]:
    return dict(plan.e2e_kwargs)


def step_endtoend(kit: Kit, step: dict[str, Any]) -> None:
    """NAT-T training and inference with the implied dispatch, forced triton and forced dense; then its logits
    with the Triton backend against the reference backend in float64."""
    import torch
    from bench_models import bench_model

    from natzoo.ops.neighborhood.dispatch import use_backend

    plan = kit.plan
    device = torch.device(plan.device)
    dtype = torch.bfloat16 if plan.device == "cuda" else None
    modes: list[tuple[str, Callable[[], contextlib.AbstractContextManager[None]]]] = [
        ("implied by the op step", lambda: implied_dispatch(kit.implied)),
        ("forced triton", lambda: use_backend("triton")), ("forced dense", lambda: use_backend("dense"))]
    for label, context in modes:
        if kit.left() < plan.row_reserve["e2e"]:
            kit.report.note(step, f"{label}: skipped (time budget)")
            continue
        try:
            with context():
                rows = bench_model(plan.e2e_model, device, plan.e2e_batch, plan.e2e_img, dtype, plan.device == "cuda",
                                   plan.model_warmup, plan.model_iters, list(plan.e2e_modes), _model_kwargs(plan))
        except Exception as exc:  # noqa: BLE001 - one dispatch failing is a row, not the end
            kit.report.add(step, {"dispatch": label, "note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"})
            continue
        finally:
            if plan.device == "cuda":
                torch.cuda.empty_cache()
        for r in rows:
            kit.report.add(step, {"dispatch": label, "model": plan.e2e_model, "mode": r["mode"],
                                  "batch": plan.e2e_batch, "img/s": r["img_s"], "ms/batch": r["seconds"] * 1e3,
                                  _peak_label(plan): r["peak_mib"]})
    kit.report.note(step, "implied dispatch: " + (", ".join(f"{'x'.join(map(str, k[0]))} d{k[1][0]} h{k[2]} -> {w}"
                                                            for k, w in sorted(kit.implied.items()))
                                                  or "none measured (library's automatic choice)"))
    if kit.left() > plan.row_reserve["e2e"]:
        for row in logit_check(plan):
            kit.report.add(step, row)


def logit_check(plan: Plan) -> list[dict[str, Any]]:
    """The e2e model's logits with the Triton backend (fp32 IEEE; bf16 autocast) against the reference backend in
    float64, same weights and inputs: max abs difference over max |logit|, top-1 agreement."""
    import timm
    import torch

    from natzoo import models  # noqa: F401  (registers the NAT family with timm)
    from natzoo.ops.neighborhood.dispatch import use_backend

    torch.manual_seed(0)
    model = timm.create_model(plan.e2e_model, num_classes=1000, **_model_kwargs(plan)).to(plan.device).eval()
    x = torch.randn(plan.logit_batch, 3, plan.e2e_img, plan.e2e_img, device=plan.device)
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    rows = []
    try:
        with torch.no_grad():
            with use_backend("reference"):
                want = model.double()(x.double())
            model.float()
            for label, autocast, limit in (("fp32", False, 1e-4), ("bf16 autocast", True, 5e-2)):
                with use_backend("triton"), torch.autocast(plan.device, torch.bfloat16, enabled=autocast):
                    got = model(x).double()
                rel = ((got - want).abs().max() / want.abs().max()).item()
                agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
                rows.append({"logit check": f"{plan.e2e_model} triton {label} vs reference float64",
                             "batch": plan.logit_batch, "max abs diff / max |logit|": rel, "top-1 agreement": agree,
                             "limit": limit, "passed": rel <= limit})
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    return rows


def step_profile(kit: Kit, step: dict[str, Any], top: int = 12) -> None:
    """torch.profiler over one NAT-T training step with the implied dispatch: the top kernels by GPU time and the
    share of the NA kernels (CPU ops and their self time in the dry run)."""
    import timm
    import torch
    import torch.nn.functional as F
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from natzoo import models  # noqa: F401  (registers the NAT family with timm)

    plan = kit.plan
    cuda = plan.device == "cuda"
    model = timm.create_model(plan.e2e_model, num_classes=1000, **_model_kwargs(plan)).to(plan.device).train()
    x = torch.randn(plan.e2e_batch, 3, plan.e2e_img, plan.e2e_img, device=plan.device)
    target = torch.randint(0, 1000, (plan.e2e_batch,), device=plan.device)
    if cuda:
        # Module.to(memory_format=) works at run time in every supported torch; torch 2.11's stubs lack the keyword
        model = cast(Any, model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train() -> None:
        with torch.autocast(plan.device, torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with implied_dispatch(kit.implied):
        train()  # warm-up: autotuning, lazy state
        prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
        with prof:
            train()
            if cuda:
                torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if cuda and event.device_type == DeviceType.CUDA:
            us = event.device_time_total
        elif not cuda and event.device_type == DeviceType.CPU:
            us = event.self_cpu_time_total
        else:
            continue
        entry = totals.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    whole = sum(us for _, us in totals.values()) or 1.0
    for name, (calls, us) in sorted(totals.items(), key=lambda item: -item[1][1])[:top]:
        kit.report.add(step, {"kernel": name[:90], "calls": calls, "ms": us / 1e3, "% of step": 100 * us / whole})
    triton_na = sum(us for name, (_, us) in totals.items() if "_na_" in name or name.startswith("natzoo::"))
    sdpa = sum(us for name, (_, us) in totals.items()
               if any(word in name.lower() for word in ("fmha", "flash", "attention", "attn")))
    kit.report.note(step, f"one {plan.e2e_model} training step (batch {plan.e2e_batch}, implied dispatch): "
                          f"{whole / 1e3:.1f} ms of {'GPU kernel' if cuda else 'CPU self'} time; NA kernels "
                          f"{100 * triton_na / whole:.1f} %, SDPA kernels (the dense NA backend) "
                          f"{100 * sdpa / whole:.1f} %")




def static_estimates(layer: Layer, batch: int, kernels: tuple[str, ...]) -> list[dict[str, Any]]:
    """static_cost.py's modelled microseconds of every autotuning config of `layer`'s training-step kernels (compiled
    for sm_90 with this machine's Triton; run in a worker process, static_cost drops ``TRITON_INTERPRET``)."""
    import torch
    from natzoo.ops.neighborhood.validation import Problem

    static_cost = _static_cost()
    n = len(layer.spatial)
    problem = Problem(f"na{n}d", n, batch, layer.spatial, layer.heads, layer.head_dim, layer.kernel, (1,) * n,
                      layer.dilation, (False,) * n, layer.head_dim**-0.5, torch.bfloat16, torch.device("meta"))
    fwd, bwd = static_cost.capture(problem, layer.rpb, layer.rpb)
    useful = static_cost.useful_scores(problem)
    cache: dict[Any, Any] = {}
    rows = []
    for launch in fwd + bwd:
        configs: list[Any] = list(launch.configs) if launch.configs else [None]  # None: a plain launch
        for config in configs:
            row = static_cost.analyse(layer.name, launch, config, useful, cache)
            if not kernels or row.kernel in kernels:
                rows.append({"layer": layer.name, "kernel": row.kernel, "config": row.config,
                             "static model us": row.model_us, "regs": row.registers,
                             "spill instr": row.spill_instructions})
    return rows


def step_autotune(kit: Kit, step: dict[str, Any]) -> None:
    """Per layer, the autotuner's time of every config it benchmarks beside static_cost's modelled time."""
    import torch

    from natzoo import ops
    from natzoo.ops.neighborhood.triton import compat

    plan = kit.plan
    layers = list(plan.autotune_layers)
    # The static model compiles for sm_90: its spawned workers must import the kernels compiled, not interpreted, and
    # Triton 3.6 decides that when a kernel module is imported (at unpickling, before the worker runs), so the dry
    # run's TRITON_INTERPRET is left out of the environment the workers start with.
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        estimates = BackgroundJobs(_static_job, [(layer, plan.timing_batch, plan.autotune_kernels) for layer in layers],
                                   min(len(layers), max(1, usable_cpus() // 2)), sys.path[:])
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    measured: dict[str, list[dict[str, Any]]] = {}
    try:
        for layer in layers:
            if kit.left() < plan.row_reserve["autotune"]:
                kit.report.note(step, f"{layer.name}: autotuner timing skipped (time budget)")
                continue
            q, k, v, rpb, grad_out, _ = layer_inputs(layer, plan.timing_batch, _timing_dtype(plan), plan.device)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)] + ([rpb.requires_grad_()] if rpb is not None
                                                                         else [])
            sink: list[dict[str, Any]] = []
            with compat.autotuner_timings(sink):
                out = getattr(ops, f"na{len(layer.spatial)}d")(*leaves[:3], layer.kernel, dilation=layer.dilation,
                                                               rpb=leaves[3] if rpb is not None else None,
                                                               backend="triton")
                torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
            measured[layer.name] = sink
        results = estimates.collect(max(1.0, kit.left()))
    finally:
        estimates.stop()
    config_label = _static_cost().config_label
    for index, layer in enumerate(layers):
        static = {(r["kernel"], r["config"]): r for r in (results.get(index) or {}).get("rows", [])}
        error = (results.get(index) or {}).get("error")
        timed = {(m["kernel"], config_label(m["config"])): m["ms"] for m in measured.get(layer.name, [])}
        for key in sorted(set(static) | set(timed)):
            est = static.get(key, {})
            ms = timed.get(key)
            model_us = est.get("static model us")
            kit.report.add(step, {"layer": layer.name, "kernel": key[0], "config": key[1], "autotuner ms": ms,
                                  "static model us": model_us, "regs": est.get("regs"),
                                  "measured / modelled": ms * 1e3 / model_us if ms and model_us else None})
        if error:
            kit.report.note(step, f"{layer.name}: static model failed: {error}")
    kit.report.note(step, f"autotuner ms: Triton's own benchmark of each config (NATZOO_NA_AUTOTUNE="
                          f"{os.environ.get('NATZOO_NA_AUTOTUNE', '')}; none where one config is left after pruning or "
                          "the kernels are interpreted); static model us: benchmarks/static_cost.py's issue/memory "
                          "model, compiled with this machine's Triton (an estimate)")


def _static_cost() -> types.ModuleType:
    """``static_cost`` imported without losing ``TRITON_INTERPRET`` (its import drops the variable so that a script
    run compiles for the GPU; the dry run's later steps still need the interpreter)."""
    interpret = os.environ.get("TRITON_INTERPRET")
    try:
        import static_cost
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return static_cost


def _static_job(layer: Layer, batch: int, kernels: tuple[str, ...]) -> dict[str, Any]:
    return {"rows": static_estimates(layer, batch, kernels), "error": None}


# ------------------------------------------------------------------------------------------------------- driver


STEPS: dict[str, Callable[[Kit, dict[str, Any]], None]] = {
    "environment": step_environment, "correctness": step_correctness, "ops": step_ops, "models": step_models,
    "endtoend": step_endtoend, "profile": step_profile, "autotune": step_autotune, "flex": step_flex,
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
                        help=f"total seconds (default {GPU_TOTAL_BUDGET:.0f} on GPU); every step also has its own "
                             "budget")
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
    import triton

    plan = dry_plan() if args.dry_run else gpu_plan()
    meta = {"versions": f"torch {torch.__version__}, Triton {triton.__version__}",
            "command": "python3 benchmarks/gpu_kit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run,
            "steps": steps, "budgets_s": plan.budgets}
    report = Report(args.out, meta)
    print(f"report: {report.md_path}", flush=True)
    kit = Kit(plan, report, args.budget)
    with counting_compiles(kit.compiles):
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
