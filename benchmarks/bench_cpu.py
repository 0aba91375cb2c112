"""CPU benchmarks of the cpu backend against the reference: NA layers and whole models (docs/benchmarks.md, "CPU").

Prints markdown tables. Timings alternate the compared variants inside one process (round-robin, medians of the
rounds), so background load hits all of them alike.

    python benchmarks/bench_cpu.py layers --threads 1 --batch 1
    python benchmarks/bench_cpu.py cache --threads 1 --batch 1
    python benchmarks/bench_cpu.py models --threads 1 --batch 1 8
    python benchmarks/bench_cpu.py demo --threads 1
    python benchmarks/bench_cpu.py peak
    python benchmarks/bench_cpu.py build
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from natzoo import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # machine.py beside this script
from machine import cpu_model  # noqa: E402

# (name, resolution, heads, dilation) of NAT-Tiny / DiNAT-Tiny at 224x224: embed 64, head_dim 32, kernel 7.
LAYERS = [
    ("56x56", 56, 2, 1), ("28x28", 28, 4, 1), ("14x14", 14, 8, 1), ("7x7", 7, 16, 1),
    ("56x56 d8", 56, 2, 8), ("28x28 d4", 28, 4, 4), ("14x14 d2", 14, 8, 2),
]
NAT_T_DEPTHS = {56: 3, 28: 4, 14: 18, 7: 5}  # NAT-Tiny's blocks per resolution
KERNEL, HEAD_DIM = 7, 32


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the functions alternated round by round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_peak(threads: int) -> float:
    """fp32 GFLOP/s of a 1024^3 matmul on `threads` threads (torch's BLAS: a practical peak of the cores)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    sec = interleaved({"mm": lambda: a @ b}, rounds=15, warmup=3)["mm"]
    return 2 * 1024**3 / sec / 1e9


def layer_flops(batch: int, res: int, heads: int) -> float:
    """Forward FLOPs: QK^T and PV, 2 * D multiply-adds per (query, key) pair each."""
    return 2 * 2 * batch * heads * res * res * KERNEL * KERNEL * HEAD_DIM


def bench_layers(batch: int, threads: int, rounds: int, peak: float | None) -> None:
    torch.set_num_threads(threads)
    print(f"\n### NA layers, batch {batch}, {threads} thread(s), fp32, kernel 7, head_dim 32 (medians, ms)\n")
    print("| layer | ref fwd | cpu fwd | fwd x | cpu GFLOP/s | % peak | ref fwd+bwd | cpu fwd+bwd | fwd+bwd x |")
    print("|---|---|---|---|---|---|---|---|---|")
    sums = {"ref": 0.0, "cpu": 0.0}
    for name, res, heads, dil in LAYERS:
        q, k, v = (torch.randn(batch, res, res, heads, HEAD_DIM, requires_grad=True) for _ in range(3))
        rpb = torch.randn(heads, 13, 13, requires_grad=True)

        def fwd(backend: str) -> Callable[[], object]:
            def run() -> object:
                with torch.no_grad():
                    return ops.na2d(q, k, v, KERNEL, dilation=dil, rpb=rpb, backend=backend)
            return run

        def train(backend: str) -> Callable[[], object]:
            def run() -> object:
                out = ops.na2d(q, k, v, KERNEL, dilation=dil, rpb=rpb, backend=backend)
                assert isinstance(out, torch.Tensor)
                return torch.autograd.grad(out.sum(), (q, k, v, rpb))
            return run

        f = interleaved({"ref": fwd("reference"), "cpu": fwd("cpu")}, rounds)
        t = interleaved({"ref": train("reference"), "cpu": train("cpu")}, rounds)
        gflops = layer_flops(batch, res, heads) / f["cpu"] / 1e9
        share = f"{100 * gflops / peak:.0f} %" if peak else "-"
        if dil == 1:
            for key in sums:
                sums[key] += NAT_T_DEPTHS[res] * t[key]
        print(f"| {name} | {f['ref'] * 1e3:.2f} | {f['cpu'] * 1e3:.2f} | {f['ref'] / f['cpu']:.1f} | {gflops:.1f} | "
              f"{share} | {t['ref'] * 1e3:.2f} | {t['cpu'] * 1e3:.2f} | {t['ref'] / t['cpu']:.1f} |")
    print(f"\nNAT-Tiny's 30 NA layers, fwd+bwd summed: reference {sums['ref'] * 1e3:.0f} ms, cpu "
          f"{sums['cpu'] * 1e3:.0f} ms ({sums['ref'] / sums['cpu']:.1f}x)")


def bench_cache(batch: int, threads: int, rounds: int) -> None:
    """The cpu backend's layers with their inputs in cache (calls back to back) and out of it (each call right after a
    1024^3 matmul, as a model's Linear layers leave the caches before the op; the backward's saved inputs are colder
    still)."""
    torch.set_num_threads(threads)
    a, b, c = torch.randn(1024, 1024), torch.randn(1024, 1024), torch.empty(1024, 1024)
    print(f"\n### cpu backend, warm and after a matmul: batch {batch}, {threads} thread(s) (medians, ms)\n")
    print("| layer | fwd warm | fwd after matmul | fwd+bwd warm | fwd+bwd after matmul |")
    print("|---|---|---|---|---|")
    for name, res, heads, dil in LAYERS:
        q, k, v = (torch.randn(batch, res, res, heads, HEAD_DIM, requires_grad=True) for _ in range(3))
        rpb = torch.randn(heads, 13, 13, requires_grad=True)

        def fwd() -> object:
            with torch.no_grad():
                return ops.na2d(q, k, v, KERNEL, dilation=dil, rpb=rpb, backend="cpu")

        def train() -> object:
            out = ops.na2d(q, k, v, KERNEL, dilation=dil, rpb=rpb, backend="cpu")
            assert isinstance(out, torch.Tensor)
            return torch.autograd.grad(out.sum(), (q, k, v, rpb))

        def after_matmul(fn: Callable[[], object]) -> float:
            torch.mm(a, b, out=c)
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        cells = []
        for fn in (fwd, train):
            cells.append(interleaved({"warm": fn}, rounds)["warm"])
            after_matmul(fn)
            cells.append(statistics.median(after_matmul(fn) for _ in range(rounds)))
        print(f"| {name} | " + " | ".join(f"{x * 1e3:.2f}" for x in cells) + " |")


def bench_models(batches: list[int], threads: int, rounds: int, train: bool) -> None:
    import timm

    import natzoo.models  # noqa: F401  (registers nat_tiny / dinat_tiny on timm)

    torch.set_num_threads(threads)
    names = ["nat_tiny", "dinat_tiny", "swin_tiny_patch4_window7_224", "convnext_tiny"]
    models = {n: timm.create_model(n, pretrained=False) for n in names}
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224)
        y = torch.randint(0, 1000, (batch,))
        fns: dict[str, Callable[[], object]] = {}
        for name, model in models.items():
            def infer(model: torch.nn.Module = model) -> object:
                with torch.no_grad():
                    return model.eval()(x)
            fns[name] = infer
        for nat in ("nat_tiny", "dinat_tiny"):
            def infer_ref(model: torch.nn.Module = models[nat]) -> object:
                with torch.no_grad(), ops.neighborhood.use_backend("reference"):
                    return model.eval()(x)
            fns[f"{nat} (reference)"] = infer_ref
        res = interleaved(fns, rounds)
        swin = res["swin_tiny_patch4_window7_224"]
        print(f"\n### Inference, batch {batch}, {threads} thread(s), 224x224 (median ms; speed relative to Swin-T)\n")
        print("| model | ms | speed vs Swin-T |\n|---|---|---|")
        for name, sec in res.items():
            print(f"| {name} | {sec * 1e3:.0f} | {swin / sec:.2f} |")
        if not train:
            continue
        fns = {name: functools.partial(_step, model, x, y, None) for name, model in models.items()}
        for nat in ("nat_tiny", "dinat_tiny"):
            fns[f"{nat} (reference)"] = functools.partial(_step, models[nat], x, y, "reference")
        res = interleaved(fns, max(1, rounds // 2))
        swin = res["swin_tiny_patch4_window7_224"]
        print(f"\n### Training step (fwd+bwd), batch {batch}, {threads} thread(s) (median ms; vs Swin-T)\n")
        print("| model | ms | speed vs Swin-T |\n|---|---|---|")
        for name, sec in res.items():
            print(f"| {name} | {sec * 1e3:.0f} | {swin / sec:.2f} |")


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, backend: str | None) -> object:
    """One training step's forward and backward (no optimizer: its cost is the same for every model)."""
    model.train()
    with ops.neighborhood.use_backend(backend):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return loss


def bench_demo(threads: int, rounds: int) -> None:
    """The CPU demo's training step (`python train.py`: nat_mini of configs/model/nat_demo.yaml, 32x32, batch 64)."""
    import timm

    import natzoo.models  # noqa: F401  (registers the models on timm)

    torch.set_num_threads(threads)
    model = timm.create_model("nat_mini", embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                              num_classes=10)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    res = interleaved({b: functools.partial(_step, model, x, y, b) for b in ("cpu", "reference")}, rounds)
    print(f"\n### CPU demo training step (nat_mini, 32x32, batch 64), {threads} thread(s)\n")
    print(f"cpu {res['cpu'] * 1e3:.0f} ms, reference {res['reference'] * 1e3:.0f} ms "
          f"({res['reference'] / res['cpu']:.2f}x)")


def bench_build() -> None:
    from natzoo.ops.neighborhood.cpu import build

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build.build(build.SOURCE.read_text(), build.find_compiler(), Path(tmp))
        print(f"first-use compile: {time.perf_counter() - start:.1f} s wall ({build.find_compiler()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["layers", "cache", "models", "demo", "peak", "build"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-train", action="store_true", help="models: inference only")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; threads {args.threads}; {time.strftime('%Y-%m-%d %H:%M')}")
    if args.what == "peak":
        print(f"fp32 matmul peak: {measure_peak(args.threads):.1f} GFLOP/s")
    elif args.what == "layers":
        peak = measure_peak(args.threads)
        print(f"fp32 matmul peak: {peak:.1f} GFLOP/s")
        for batch in args.batch:
            bench_layers(batch, args.threads, args.rounds, peak)
    elif args.what == "cache":
        for batch in args.batch:
            bench_cache(batch, args.threads, args.rounds)
    elif args.what == "models":
        bench_models(args.batch, args.threads, args.rounds, not args.no_train)
    elif args.what == "demo":
        bench_demo(args.threads, args.rounds)
    else:
        bench_build()


if __name__ == "__main__":
    main()
