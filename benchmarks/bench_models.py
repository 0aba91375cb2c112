"""Throughput and peak memory of NAT/DiNAT against Swin and ConvNeXt, for inference and training steps.

CPU mode (default): float32, batch 8. GPU mode (``--device cuda``): bfloat16 autocast, batch 128, channels-last
inputs and weights. Prints a markdown table (paste it into docs/benchmarks.md with the printed header).

Examples:
    python benchmarks/bench_models.py                       # CPU, fp32, batch 8
    python benchmarks/bench_models.py --device cuda         # GPU, bf16, batch 128, channels-last
    python benchmarks/bench_models.py --models nat_tiny swin_tiny_patch4_window7_224 --iters 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from natzoo import models  # noqa: F401  (registers the NAT family with timm)

DEFAULT_MODELS = ["nat_tiny", "dinat_tiny", "swin_tiny_patch4_window7_224", "convnext_tiny"]


def _rss_peak_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset = _reset_rss_peak() if device.type == "cpu" else False
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    # Median per-iteration time: robust to other processes competing for the CPU.
    elapsed = sorted(times)[len(times) // 2] * iters
    peak: float | None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _rss_peak_mib() if reset else float("nan")
    return {"seconds": elapsed / iters, "peak_mib": peak if peak is not None else float("nan")}


def bench_model(
    name: str,
    device: torch.device,
    batch: int,
    img_size: int,
    dtype: torch.dtype | None,
    channels_last: bool,
    warmup: int,
    iters: int,
    modes: list[str],
    model_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Inference and/or training-step rows of one model: seconds per batch, img/s, peak memory (on CUDA: above what
    was allocated before the model was built, so earlier models' leftovers do not count)."""
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = timm.create_model(name, num_classes=1000, **(model_kwargs or {})).to(device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    )
    rows: list[dict[str, Any]] = []
    if "infer" in modes:
        model.eval()

        def infer() -> None:
            with torch.no_grad(), autocast:
                model(x)

        rows.append(dict(model=name, params=params, mode="inference", **_measure(infer, device, warmup, iters)))
    if "train" in modes:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train() -> None:
            with autocast:
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        rows.append(dict(model=name, params=params, mode="train step", **_measure(train, device, warmup, iters)))
    for row in rows:
        row["img_s"] = batch / row["seconds"]
        if device.type == "cuda":
            row["peak_mib"] -= base / 2**20
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 128 on GPU")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: fp32 CPU, bf16 GPU")
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: GPU only"
    )
    parser.add_argument("--warmup", type=int, default=None, help="default: 1 on CPU, 5 on GPU")
    parser.add_argument("--iters", type=int, default=None, help="default: 3 on CPU, 20 on GPU")
    parser.add_argument("--modes", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each model in a fresh process on CPU, so peak RSS (VmHWM) is that model's alone",
    )
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    gpu = device.type == "cuda"
    batch = args.batch or (128 if gpu else 8)
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    channels_last = gpu if args.channels_last is None else args.channels_last
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    iters = args.iters if args.iters is not None else (20 if gpu else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True

    name = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()} CPU"
    threads = "" if gpu else f", {torch.get_num_threads()} threads"
    print(f"device: {name}{threads}")
    print(f"date: {datetime.date.today().isoformat()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}")
    print(f"command: python benchmarks/bench_models.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"settings: batch {batch}, {dtype_name}, img {args.img_size}, channels_last={channels_last}, "
        f"warmup {warmup}, iters {iters}"
    )
    print()
    memory = "peak alloc above start (MiB)" if gpu else "peak RSS (MiB)"
    print(f"| model | params (M) | mode | img/s | ms/batch | {memory} |")
    print("|---|---|---|---|---|---|")
    if args.json:
        rows = bench_model(
            args.models[0], device, batch, args.img_size, dtype, channels_last, warmup, iters, args.modes
        )
        print(json.dumps(rows))
        return
    for model_name in args.models:
        if args.isolate and not gpu and len(args.models) > 1:
            cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
            cmd += ["--models", model_name, "--json"]
            result = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows = json.loads(result.stdout.strip().splitlines()[-1])
        else:
            rows = bench_model(
                model_name, device, batch, args.img_size, dtype, channels_last, warmup, iters, args.modes
            )
        if gpu:
            torch.cuda.empty_cache()  # the previous model is unreferenced once bench_model returned
        for row in rows:
            print(
                f"| {row['model']} | {row['params']:.1f} | {row['mode']} | {row['img_s']:.1f} | "
                f"{row['seconds'] * 1000:.0f} | {row['peak_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
