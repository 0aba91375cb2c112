"""CPU inference speed of exported models: onnxruntime against PyTorch eager, float32.

Each model is exported with :func:`natzoo.tools.export.export_onnx` (dynamic batch, native resolution) and run by
onnxruntime's CPU execution provider with as many intra-op threads as torch uses; the same batches go through the
PyTorch model in eval mode under ``torch.inference_mode``. The weights are random (speed does not depend on them).
Prints the setup and a markdown table (median time per batch, images per second, largest output difference).

With ``--sizes``, each model is instead exported once with a dynamic height and width (``dynamic=True``) and once
statically per size, and eager PyTorch, the static file and the dynamic file are timed at each size (alternating
within every iteration), at the first of ``--batches``.

Examples:
    python benchmarks/bench_export.py                                  # nat_tiny, dinat_tiny at batch 1 and 8
    python benchmarks/bench_export.py --models nat_mini --batches 1 --iters 5
    python benchmarks/bench_export.py --models nat_mini dinat_mini --batches 1 --sizes 224x224 256x320
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from natzoo import models  # noqa: F401  (registers the NAT family with timm)
from natzoo.tools.export import export_onnx, native_input_size

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # machine.py beside this script
from machine import cpu_model  # noqa: E402


def _paired_medians(steps: list[Callable[[], object]], warmup: int, iters: int) -> list[float]:
    """Median seconds of each step; the steps alternate within every iteration, so a load that comes and goes on a
    shared machine hits them alike."""
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(iters):
        for step, record in zip(steps, times):
            start = time.perf_counter()
            step()
            record.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def bench_model(name: str, batches: list[int], warmup: int, iters: int, threads: int, folder: Path) -> list[dict]:
    """Exports ``name`` once and times eager PyTorch and onnxruntime at each batch size."""
    model = timm.create_model(name).eval()
    size = native_input_size(model)
    start = time.perf_counter()
    path = export_onnx(model, folder / f"{name}.onnx")
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    mib = path.stat().st_size / 2**20
    rows = []
    for batch in batches:
        x = torch.randn(batch, *size)
        feed = {session.get_inputs()[0].name: x.numpy()}
        with torch.inference_mode():
            eager_s, ort_s = _paired_medians([functools.partial(model, x), functools.partial(session.run, None, feed)],
                                             warmup, iters)
            expected = model(x).numpy()
        diff = float(np.abs(session.run(None, feed)[0] - expected).max())
        rows.append({"model": name, "input": "x".join(map(str, size[1:])), "batch": batch, "eager_s": eager_s,
                     "ort_s": ort_s, "diff": diff, "export_s": export_s, "onnx_mib": mib})
    return rows


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench_dynamic(name: str, sizes: list[tuple[int, int]], batch: int, warmup: int, iters: int, threads: int,
                  folder: Path) -> list[dict]:
    """Exports ``name`` once with a dynamic height and width and once per size statically; times eager PyTorch, the
    static file and the dynamic file at each size."""
    model = timm.create_model(name).eval()
    start = time.perf_counter()
    dynamic_path = export_onnx(model, folder / f"{name}_dynamic.onnx", dynamic=True)
    dynamic_export_s = time.perf_counter() - start
    dynamic = _session(dynamic_path, threads)
    rows = []
    for height, width in sizes:
        start = time.perf_counter()
        static_path = export_onnx(model, folder / f"{name}_{height}x{width}.onnx", input_size=(3, height, width))
        static_export_s = time.perf_counter() - start
        static = _session(static_path, threads)
        x = torch.randn(batch, 3, height, width)
        feed = {"input": x.numpy()}
        with torch.inference_mode():
            eager_s, static_s, dynamic_s = _paired_medians(
                [functools.partial(model, x), functools.partial(static.run, None, feed),
                 functools.partial(dynamic.run, None, feed)], warmup, iters)
            expected = model(x).numpy()
        rows.append({
            "model": name, "input": f"{height}x{width}", "batch": batch, "eager_s": eager_s, "static_s": static_s,
            "dynamic_s": dynamic_s, "static_diff": float(np.abs(static.run(None, feed)[0] - expected).max()),
            "dynamic_diff": float(np.abs(dynamic.run(None, feed)[0] - expected).max()),
            "static_export_s": static_export_s, "dynamic_export_s": dynamic_export_s,
            "static_mib": static_path.stat().st_size / 2**20, "dynamic_mib": dynamic_path.stat().st_size / 2**20,
        })
        print(f"# {rows[-1]}", flush=True)  # progress: a long run on a shared machine keeps what it measured
        del static
        static_path.unlink()
    return rows


def _print_dynamic(rows: list[dict]) -> None:
    print("| model | input | batch | PyTorch eager ms | ORT static ms | ORT dynamic ms | static speed-up | "
          "dynamic speed-up | dynamic / static | max abs diff static, dynamic |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['batch']} | {1000 * r['eager_s']:.0f} | {1000 * r['static_s']:.0f} "
              f"| {1000 * r['dynamic_s']:.0f} | {r['eager_s'] / r['static_s']:.2f}x | "
              f"{r['eager_s'] / r['dynamic_s']:.2f}x | {r['dynamic_s'] / r['static_s']:.2f} | "
              f"{r['static_diff']:.1e}, {r['dynamic_diff']:.1e} |")
    print()
    for r in rows:
        print(f"{r['model']} {r['input']}: static export {r['static_export_s']:.0f} s, {r['static_mib']:.0f} MiB; "
              f"dynamic export {r['dynamic_export_s']:.0f} s, {r['dynamic_mib']:.0f} MiB")


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    try:
        return int(height), int(width or height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is HxW or S, got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["nat_tiny", "dinat_tiny"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and onnxruntime threads")
    parser.add_argument("--sizes", nargs="+", type=_size, default=None,
                        help="HxW sizes: compare static and dynamic-resolution exports (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            if args.sizes:
                rows += bench_dynamic(name, args.sizes, args.batches[0], args.warmup, args.iters, args.threads,
                                      Path(folder))
            else:
                rows += bench_model(name, args.batches, args.warmup, args.iters, args.threads, Path(folder))

    print(f"{datetime.date.today()}, {cpu_model()}, {os.cpu_count()} logical CPUs, {args.threads} threads for torch "
          f"and onnxruntime, load average {load:.2f} at the start; Python {platform.python_version()}, "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, timm {timm.__version__}")
    print(f"Command: python benchmarks/bench_export.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"Median of {args.iters} iterations (eager and onnxruntime alternating) after {args.warmup} warm-up, "
          "float32, random weights.\n")
    if args.sizes:
        _print_dynamic(rows)
        return
    print("| model | input | batch | PyTorch eager ms | PyTorch img/s | onnxruntime ms | onnxruntime img/s | "
          "speed-up | "
          "max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['batch']} | {1000 * r['eager_s']:.0f} | "
              f"{r['batch'] / r['eager_s']:.1f} | {1000 * r['ort_s']:.0f} | {r['batch'] / r['ort_s']:.1f} | "
              f"{r['eager_s'] / r['ort_s']:.2f}x | {r['diff']:.1e} |")
    print()
    for name in args.models:
        r = next(r for r in rows if r["model"] == name)
        print(f"{name}: export {r['export_s']:.0f} s, ONNX file {r['onnx_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
