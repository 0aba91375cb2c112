"""GPU kit: checks and measures the fused NA kernels on one GPU in one short run (<= 8 minutes on an H100).

Usage::

    python benchmarks/gpu_kit.py --out $OUT/kit             # one GPU, cold Triton cache included
    python benchmarks/gpu_kit.py --dry-run --out /tmp/kit   # CPU, Triton interpreter, tiny shapes (CI, < 3 min)

Steps, in this order; ``<out>/kit.json`` and ``<out>/kit.md`` are rewritten after every row, so a run cut short
keeps everything measured so far, and a failing step is recorded and the kit goes on with the next one:

1. environment: GPU, driver, torch/triton/timm versions, ``TRITON_INTERPRET`` forced off (on in ``--dry-run``);
2. correctness at the NAT-Tiny/DiNAT-Tiny layer shapes (batch 8; k=7, head_dim 32, rpb) in bf16, fp16 and fp32
   against the reference backend in float64: out, lse, dq, dk, dv, d_rpb; then a race check (forward+backward 20
   times: out, lse, dq, dk, dv bit-identical; atomic-mode d_rpb within a bound; deterministic-mode d_rpb
   bit-identical);
3. op timing (CUDA events, warm-up, median): the NAT-Tiny/DiNAT-Tiny layers at batch 128, one head_dim-128 2-D and
   one 3-D shape; fused forward and forward+backward with and without rpb, FlexAttention compiled afresh for every
   shape (Dynamo reset; the row says whether a graph was compiled; shapes beyond the first two only while time is
   left), dense SDPA; useful TFLOP/s and the fraction of the bandwidth floor measured on the same device;
4. model throughput: ``nat_tiny``, ``dinat_tiny``, timm's ``swin_tiny_patch4_window7_224`` and ``convnext_tiny``,
   bf16 autocast, batch 128, channels-last; inference and a full training step (forward, loss, backward, AdamW);
   img/s, peak memory and the ratio to Swin-T from the same run.

It needs torch, triton, timm and the repository (put on ``sys.path`` here; no install, no Hydra, no network).
Autotuning runs in ``quick`` mode (``NATZOO_NA_AUTOTUNE``, two configs per kernel; ``off``, one config, during the
correctness step) to bound compilation: about 80 kernel compilations in all.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.dirname(os.path.abspath(__file__))

# Tolerances against a float64 ground truth: (out/lse atol=rtol, dq/dk/dv atol=rtol, d_rpb relative L2).
TOLERANCES = {"float32": (1e-5, 1e-4, 1e-5), "float16": (2e-3, 1e-2, 5e-3), "bfloat16": (1.6e-2, 5e-2, 2e-2)}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One NA problem: a map of `size`^n with `heads` heads, kernel `kernel` and dilation `dilation`."""

    name: str
    spatial: tuple[int, ...]
    heads: int
    head_dim: int
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    rpb: bool = True


def nat_layers(scale: int = 1) -> list[Layer]:
    """The NAT-Tiny and DiNAT-Tiny layer problems at 224 px (maps 56/28/14/7, heads 2/4/8/16; dilations 8/4/2)."""
    layers = []
    for size, heads, dil in ((56, 2, 8), (28, 4, 4), (14, 8, 2), (7, 16, 1)):
        size //= scale
        layers.append(Layer(f"nat-tiny {size}x{size} h{heads}", (size, size), heads, 32, (7, 7), (1, 1)))
        if dil > 1:
            d = max(1, dil // scale)
            layers.append(Layer(f"dinat-tiny {size}x{size} h{heads} d{d}", (size, size), heads, 32, (7, 7), (d, d)))
    return layers


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything that differs between the GPU run and the dry run; the code path is the same."""

    device: str
    correctness_batch: int
    correctness_layers: list[Layer]
    race_layer: Layer
    race_runs: int
    deterministic_runs: int
    timing_batch: int
    timing_layers: list[Layer]
    flex_always: int  # FlexAttention rows for the first N timing layers; later ones only while time is left
    extra_layers: list[tuple[Layer, int]]  # (layer, batch): the head_dim-128 2-D and the 3-D shape
    warmup: int
    repeats: int
    compile_flex: bool
    models: list[str]
    model_batch: int
    model_dtype: str | None
    model_warmup: int
    model_iters: int
    reserve_s: tuple[float, float, float]  # budget kept back: per timing row, for FlexAttention rows, per model


def gpu_plan() -> Plan:
    return Plan(
        device="cuda", correctness_batch=8, correctness_layers=nat_layers(), race_layer=nat_layers()[0], race_runs=20,
        deterministic_runs=3,
        timing_batch=128, timing_layers=nat_layers(), flex_always=2,
        extra_layers=[(Layer("2d 64x64 k13 hd128", (64, 64), 8, 128, (13, 13), (1, 1), rpb=False), 8),
                      (Layer("3d 16x32x32 k3x7x7 hd64", (16, 32, 32), 8, 64, (3, 7, 7), (1, 1, 1), rpb=False), 1)],
        warmup=5, repeats=20, compile_flex=True,
        models=["nat_tiny", "dinat_tiny", "swin_tiny_patch4_window7_224", "convnext_tiny"], model_batch=128,
        model_dtype="bf16", model_warmup=3, model_iters=10, reserve_s=(60.0, 150.0, 45.0),
    )


def dry_plan() -> Plan:
    tiny = [Layer("tiny 8x8 h1", (8, 8), 1, 16, (3, 3), (1, 1)), Layer("tiny 8x8 h1 d2", (8, 8), 1, 16, (3, 3), (2, 2))]
    return Plan(
        device="cpu", correctness_batch=1, correctness_layers=tiny, race_layer=tiny[0], race_runs=2,
        deterministic_runs=2,
        timing_batch=1, timing_layers=tiny, flex_always=1,
        extra_layers=[(Layer("tiny 3d 4x4x4 k3", (4, 4, 4), 1, 16, (3, 3, 3), (1, 1, 1), rpb=False), 1)],
        warmup=0, repeats=1, compile_flex=False,
        models=["nat_tiny", "swin_tiny_patch4_window7_224"], model_batch=1, model_dtype=None, model_warmup=0,
        model_iters=1, reserve_s=(5.0, 20.0, 10.0),
    )


class Report:
    """The kit's results, rewritten to ``kit.json`` and ``kit.md`` (atomically) after every change."""

    def __init__(self, out_dir: str, meta: dict) -> None:
        self.out_dir = out_dir
        self.data: dict[str, Any] = {"meta": meta, "steps": []}
        os.makedirs(out_dir, exist_ok=True)
        self.write()

    def step(self, name: str) -> dict:
        step: dict[str, Any] = {"name": name, "status": "running", "seconds": None, "rows": [], "notes": [],
                                "error": None}
        self.data["steps"].append(step)
        self.write()
        return step

    def add(self, step: dict, row: dict) -> None:
        step["rows"].append(row)
        print(f"  [{step['name']}] " + ", ".join(f"{k}={_cell(v)}" for k, v in row.items()), flush=True)
        self.write()

    def note(self, step: dict, text: str) -> None:
        step["notes"].append(text)
        print(f"  [{step['name']}] {text}", flush=True)
        self.write()

    def write(self) -> None:
        for name, text in (("kit.json", json.dumps(self.data, indent=1, default=str)), ("kit.md", self.markdown())):
            path = os.path.join(self.out_dir, name)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)

    def markdown(self) -> str:
        meta = self.data["meta"]
        lines = ["# GPU kit results", "", f"Command: `{meta['command']}`; started {meta['started']}.", ""]
        for step in self.data["steps"]:
            seconds = "" if step["seconds"] is None else f", {step['seconds']:.0f} s"
            lines += [f"## {step['name']} ({step['status']}{seconds})", ""]
            if step["rows"]:
                columns = []
                for row in step["rows"]:
                    columns += [key for key in row if key not in columns]
                lines.append("| " + " | ".join(columns) + " |")
                lines.append("|" + "---|" * len(columns))
                for row in step["rows"]:
                    lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
                lines.append("")
            lines += [f"* {note}" for note in step["notes"]]
            if step["error"]:
                lines += ["", "```", step["error"], "```"]
            lines.append("")
        return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Kit:
    """Runs the steps against a time budget; a step that raises is recorded and the next one runs."""

    def __init__(self, plan: Plan, report: Report, budget_s: float) -> None:
        self.plan = plan
        self.report = report
        self.deadline = time.monotonic() + budget_s

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, fn: Callable[[Kit, dict], None]) -> None:
        print(f"== {name} ({self.remaining():.0f} s of budget left)", flush=True)
        step = self.report.step(name)
        start = time.monotonic()
        try:
            fn(self, step)
            step["status"] = "ok"
        except Exception:  # noqa: BLE001 - recorded in the report, the kit goes on with the next step
            step["status"] = "failed"
            step["error"] = traceback.format_exc()[-4000:]
            print(step["error"], flush=True)
        finally:
            step["seconds"] = time.monotonic() - start
            self.report.write()


# ---------------------------------------------------------------------------------------------- step 1: environment


def step_environment(kit: Kit, step: dict) -> None:
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
        if row["kernels"] != "JITFunction":
            raise RuntimeError(f"kernels are {row['kernels']}, not compiled JIT functions (TRITON_INTERPRET leaked?)")
    else:
        row.update(gpu="none (dry run: CPU, Triton interpreter)")
    kit.report.add(step, row)


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


# -------------------------------------------------------------------------------------------- step 2: correctness


def layer_inputs(layer: Layer, batch: int, dtype, device: str, seed: int = 0):
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


def forward_backward(layer: Layer, q, k, v, rpb, grad_out, grad_lse, backend: str, dtype=None):
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


def compare(got, ref, dtype_name: str) -> tuple[dict, bool]:
    tol_out, tol_grad, tol_rpb = TOLERANCES[dtype_name]
    names = ["out", "lse", "dq", "dk", "dv", "d_rpb"]
    values = [got[0], got[1], *got[2]]
    refs = [ref[0], ref[1], *ref[2]]
    row, ok = {}, True
    for name, a, b in zip(names, values, refs):
        a, b = a.double(), b.double()
        if name == "d_rpb":
            err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
            ok &= err <= tol_rpb
        else:
            tol = tol_out if name in ("out", "lse") else tol_grad
            err = (a - b).abs().max().item()
            ok &= bool(((a - b).abs() <= tol + tol * b.abs()).all()) and bool(a.isfinite().all())
        row[name] = err
    return row, ok


def step_correctness(kit: Kit, step: dict) -> None:
    import torch

    torch.set_float32_matmul_precision("highest")  # fp32 checked with IEEE products
    # One config per kernel here (the one deterministic mode uses): half the compilations of quick mode; the timing
    # step then compiles the second config of the bf16 problems.
    mode = os.environ.get("NATZOO_NA_AUTOTUNE")
    os.environ["NATZOO_NA_AUTOTUNE"] = "off"
    try:
        failures = _check_layers(kit, step)
    finally:
        os.environ["NATZOO_NA_AUTOTUNE"] = mode or "full"
    failures += race_check(kit, step)
    kit.report.note(step, "errors: max abs for out/lse/dq/dk/dv, relative L2 for d_rpb; tolerances (out/lse, grads, "
                          f"d_rpb) {TOLERANCES}; autotuning off (first config)")
    if failures:
        raise AssertionError(f"{failures} correctness check(s) failed (see the rows)")


def _check_layers(kit: Kit, step: dict) -> int:
    import torch

    plan = kit.plan
    failures = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        for layer in plan.correctness_layers:
            q, k, v, rpb, grad_out, grad_lse = layer_inputs(layer, plan.correctness_batch, dtype, plan.device)
            got = forward_backward(layer, q, k, v, rpb, grad_out, grad_lse, "triton")
            ref = forward_backward(layer, q, k, v, rpb, grad_out, grad_lse, "reference", torch.float64)
            errors, ok = compare(got, ref, name)
            failures += not ok
            kit.report.add(step, {"check": "vs reference fp64", "layer": layer.name, "dtype": name,
                                  "batch": plan.correctness_batch, **{f"{k} err": v for k, v in errors.items()},
                                  "pass": ok})
    return failures


def race_check(kit: Kit, step: dict) -> int:
    """Repeated forward+backward: out, lse, dq, dk, dv bit-identical; d_rpb bounded (atomic) / identical."""
    import torch

    plan, layer = kit.plan, kit.plan.race_layer
    q, k, v, rpb, grad_out, grad_lse = layer_inputs(layer, plan.correctness_batch, torch.bfloat16, plan.device, 1)
    first = forward_backward(layer, q, k, v, rpb, grad_out, grad_lse, "triton")
    mismatches, drift = 0, 0.0
    for _ in range(plan.race_runs - 1):
        again = forward_backward(layer, q, k, v, rpb, grad_out, grad_lse, "triton")
        mismatches += sum(not torch.equal(a, b) for a, b in zip([first[0], first[1], *first[2][:3]],
                                                                 [again[0], again[1], *again[2][:3]]))
        drift = max(drift, ((again[2][3] - first[2][3]).norm() / first[2][3].norm()).item())
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = [forward_backward(layer, q, k, v, rpb, grad_out, grad_lse, "triton")[2][3]
               for _ in range(plan.deterministic_runs)]
    finally:
        torch.use_deterministic_algorithms(previous)
    det_equal = all(torch.equal(det[0], d) for d in det[1:])
    ok = mismatches == 0 and drift <= 1e-5 and det_equal
    kit.report.add(step, {"check": f"race: {plan.race_runs} fwd+bwd runs", "layer": layer.name, "dtype": "bfloat16",
                          "batch": plan.correctness_batch, "bitwise mismatches (out, lse, dq, dk, dv)": mismatches,
                          "atomic d_rpb max rel drift": drift, "deterministic d_rpb identical": det_equal,
                          "pass": ok})
    return int(not ok)


# -------------------------------------------------------------------------------------------- step 3: op timing


def useful_scores(layer: Layer, batch: int) -> int:
    """batch * heads * sum over queries of the neighbourhood size (non-causal windows hold exactly k keys)."""
    return batch * layer.heads * math.prod(layer.spatial) * math.prod(layer.kernel)


def step_timing(kit: Kit, step: dict) -> None:
    import torch
    from bench_op import device_limits, time_ms

    plan = kit.plan
    dtype = torch.bfloat16 if plan.device == "cuda" else torch.float32
    bandwidth, peak = device_limits(plan.device, dtype)
    if bandwidth is not None and peak is not None:
        kit.report.note(step, f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s, {dtype} matmul peak "
                              f"{peak / 1e12:.0f} TFLOP/s (8192^3) on this device")
    plan_rows = [(layer, plan.timing_batch, i < plan.flex_always) for i, layer in enumerate(plan.timing_layers)]
    plan_rows += [(layer, batch, True) for layer, batch in plan.extra_layers]
    for layer, batch, flex_always in plan_rows:
        providers = [("triton", True), ("triton", False)] if layer.rpb else [("triton", False)]
        providers += [("sdpa-dense", False)]
        if flex_always or kit.remaining() > plan.reserve_s[1]:
            providers.append(("flex", False))
        else:
            kit.report.note(step, f"{layer.name}: FlexAttention skipped (time budget)")
        for provider, with_rpb in providers:
            if kit.remaining() < plan.reserve_s[0]:
                kit.report.note(step, f"{layer.name} {provider}: skipped (time budget)")
                continue
            row = {"layer": layer.name, "batch": batch, "provider": provider, "rpb": with_rpb}
            try:
                row.update(time_provider(layer, batch, provider, with_rpb, dtype, plan, time_ms, bandwidth))
            except Exception as exc:  # noqa: BLE001 - one provider failing on one shape is a row, not the end
                row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            finally:
                if plan.device == "cuda":
                    torch.cuda.empty_cache()
            kit.report.add(step, row)
    summarise_timing(kit, step)


def time_provider(layer: Layer, batch: int, provider: str, with_rpb: bool, dtype, plan: Plan, time_ms,
                  bandwidth) -> dict:
    import torch
    from bench_op import compiled_graphs, na_mask_mod

    from natzoo import ops

    q, k, v, rpb, _, _ = layer_inputs(layer, batch, dtype, plan.device)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    rpb = rpb.requires_grad_() if with_rpb and rpb is not None else None
    n, tokens, note = len(layer.spatial), math.prod(layer.spatial), ""
    # FlexAttention has no backward on CPU: the dry run times its forward only.
    backward = plan.device == "cuda" or provider != "flex"
    if provider == "triton":
        fn = getattr(ops, f"na{n}d")

        def fwd():
            return fn(q, k, v, layer.kernel, dilation=layer.dilation, rpb=rpb, backend="triton")

    else:
        flat = [(t if backward else t.detach()).reshape(batch, tokens, layer.heads, layer.head_dim).transpose(1, 2)
                for t in (q, k, v)]
        if provider == "sdpa-dense":
            note = "all N^2 scores"

            def fwd():
                return torch.nn.functional.scaled_dot_product_attention(*flat)

        else:
            from bench_op import Shape
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            shape = Shape(layer.name, batch, layer.spatial, layer.heads, layer.head_dim, layer.kernel, layer.dilation)
            block_mask = create_block_mask(na_mask_mod(shape), None, None, tokens, tokens, device=plan.device)
            torch._dynamo.reset()  # a fresh compile per shape: no silent eager fallback after the recompile limit
            if plan.compile_flex:
                flex = torch.compile(flex_attention)
            else:
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                flex = flex_attention
            graphs = compiled_graphs()

            def fwd():
                # flat holds exactly q, k, v
                return flex(*flat, block_mask=block_mask)  # type: ignore[misc]

    grad: list[torch.Tensor] = []

    def fwdbwd():
        out = fwd()
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])

    if plan.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
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
    row = {"fwd ms": fwd_ms, "fwd+bwd ms": fwdbwd_ms, "fwd useful TFLOP/s": flops / (fwd_ms * 1e-3) / 1e12,
           "fwd+bwd useful TFLOP/s": 3.5 * flops / (fwdbwd_ms * 1e-3) / 1e12 if fwdbwd_ms else None}
    if bandwidth is not None:
        moved = 4 * q.numel() * q.element_size()  # q, k, v read and out written once
        row["fwd % of bandwidth floor"] = 100.0 * moved / bandwidth / (fwd_ms * 1e-3)
        row["peak MiB"] = torch.cuda.max_memory_allocated() / 2**20
    row["note"] = note
    return row


def summarise_timing(kit: Kit, step: dict) -> None:
    """The issue's targets from this run: fused vs FlexAttention, and the cost of rpb."""
    rows = [r for r in step["rows"] if r.get("fwd+bwd ms")]
    for layer in {r["layer"] for r in rows}:
        by = {(r["provider"], r["rpb"]): r for r in rows if r["layer"] == layer}
        fused, plain, flex = by.get(("triton", True)), by.get(("triton", False)), by.get(("flex", False))
        parts = []
        if plain and flex:
            parts.append(f"fused fwd+bwd (no rpb) is {flex['fwd+bwd ms'] / plain['fwd+bwd ms']:.2f}x FlexAttention "
                         f"({flex.get('note', '')})")
        if fused and plain:
            parts.append(f"rpb costs {100 * (fused['fwd+bwd ms'] / plain['fwd+bwd ms'] - 1):.0f} % in fwd+bwd")
        if parts:
            kit.report.note(step, f"{layer}: " + "; ".join(parts))


# ------------------------------------------------------------------------------------- step 4: model throughput


def step_models(kit: Kit, step: dict) -> None:
    import torch
    from bench_models import bench_model

    plan = kit.plan
    device = torch.device(plan.device)
    dtype = {"bf16": torch.bfloat16, None: None}[plan.model_dtype]
    if plan.device == "cuda":
        torch.backends.cudnn.benchmark = True
    for name in plan.models:
        if kit.remaining() < plan.reserve_s[2]:
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
        for row in rows:
            kit.report.add(step, {"model": name, "mode": row["mode"], "batch": plan.model_batch,
                                  "img/s": row["img_s"], "ms/batch": row["seconds"] * 1e3,
                                  "peak MiB": row["peak_mib"], "params M": row["params"]})
    swin = {r["mode"]: r["img/s"] for r in step["rows"] if r["model"].startswith("swin") and "img/s" in r}
    for row in step["rows"]:
        if "img/s" in row and row["mode"] in swin:
            row["x Swin-T"] = row["img/s"] / swin[row["mode"]]
    kit.report.note(step, f"{plan.model_dtype or 'fp32'} autocast, channels-last={plan.device == 'cuda'}, "
                          f"{plan.model_warmup} warm-up + median of {plan.model_iters} iterations; train step = "
                          "forward, cross-entropy, backward, AdamW step")
    kit.report.write()


# ------------------------------------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for kit.json and kit.md (created)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds before optional rows are skipped (default 420 on GPU, 170 dry run)")
    parser.add_argument("--autotune", default="quick", choices=["full", "quick", "off"],
                        help="NATZOO_NA_AUTOTUNE for this run (default quick: two configs per kernel)")
    args = parser.parse_args(argv)

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
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run}
    report = Report(args.out, meta)
    kit = Kit(plan, report, args.budget if args.budget is not None else (170 if args.dry_run else 420))
    for name, fn in (("1. environment", step_environment), ("2. correctness", step_correctness),
                     ("3. op timing", step_timing), ("4. model throughput", step_models)):
        kit.run(name, fn)
    report.data["meta"]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    report.write()
    failed = [s["name"] for s in report.data["steps"] if s["status"] != "ok"]
    print(f"done: {os.path.join(args.out, 'kit.md')}" + (f"; failed steps: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
