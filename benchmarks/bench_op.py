"""Op benchmark: the fused Triton NA kernels against the dense and reference backends, FlexAttention and SDPA.

Usage::

    python benchmarks/bench_op.py                      # GPU: full table (NAT/DiNAT-Tiny layers, 2D/3D/1D shapes)
    python benchmarks/bench_op.py --quick --device cpu # smoke test: tiny shapes, reference (+ interpreter) on CPU

Times forward and forward+backward on the GPU: calls launched back to back between two CUDA events (no
synchronisation per call; median of three blocks) and, beside it, the GPU kernel time per call from ``torch.profiler``
(wall clock on CPU). FlexAttention runs with the rpb as a ``score_mod`` (table requiring grad). Reports useful
TFLOP/s (``4 * B * heads * N * prod(k) * head_dim`` per forward; forward+backward counts 3.5x that), the
"roofline floor" ``max(bytes / bandwidth, FLOPs / peak)`` with bandwidth and peak measured on the device in the same
run (a large copy and a large matmul in the benchmark dtype), the fraction of that floor reached, and peak memory.
FlexAttention is compiled afresh for every shape (``torch._dynamo.reset()`` first, so no row silently falls back to
eager after Dynamo's recompile limit); its rows say whether a graph was compiled. ``<out>/bench_op.json`` and
``<out>/bench_op.md`` are rewritten after every row. Imports only torch/triton/ops (no Hydra).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from natzoo import ops


@dataclass
class Shape:
    name: str
    batch: int
    spatial: tuple[int, ...]
    heads: int
    head_dim: int
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...] = ()  # () means 1 on every axis
    is_causal: tuple[bool, ...] = ()  # () means False on every axis
    rpb: bool = False

    def __post_init__(self) -> None:
        n = len(self.spatial)
        self.dilation = self.dilation or (1,) * n
        self.is_causal = self.is_causal or (False,) * n

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    def flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.tokens * math.prod(self.kernel_size) * self.head_dim


def full_shapes() -> list[Shape]:
    shapes = []
    for size, heads, dil in ((56, 2, 8), (28, 4, 4), (14, 8, 2), (7, 16, 1)):
        shapes.append(Shape(f"nat-tiny {size}x{size} h{heads}", 128, (size, size), heads, 32, (7, 7), rpb=True))
        if dil > 1:
            shapes.append(Shape(f"dinat-tiny {size}x{size} h{heads} d{dil}", 128, (size, size), heads, 32, (7, 7),
                                dilation=(dil, dil), rpb=True))
    for d in (64, 128):
        shapes.append(Shape(f"2d 64x64 k13 hd{d}", 8, (64, 64), 8, d, (13, 13)))
        shapes.append(Shape(f"3d video 16x32x32 k3x7x7 hd{d}", 1, (16, 32, 32), 8, d, (3, 7, 7)))
    shapes.append(Shape("1d 32768 k2048 hd128", 1, (32768,), 8, 128, (2048,)))
    return shapes


def quick_shapes() -> list[Shape]:
    return [
        Shape("tiny 2d 14x14 k7", 2, (14, 14), 2, 32, (7, 7), rpb=True),
        Shape("tiny 2d 14x14 k7 d2", 2, (14, 14), 2, 32, (7, 7), dilation=(2, 2), rpb=True),
        Shape("tiny 1d 64 k9 causal", 2, (64,), 2, 32, (9,), is_causal=(True,)),
    ]


def na_mask_mod(shape: Shape):
    """FlexAttention mask_mod of the neighbourhood (docs/ops.md) for stride 1, from tensor ops only."""
    spatial, ks, dil, causal = shape.spatial, shape.kernel_size, shape.dilation, shape.is_causal

    def axis_ok(x, y, length, k, d, c):
        g = x % d
        i, j = x // d, y // d
        group_len = (length - g + d - 1) // d
        if c:
            start = torch.clamp(i - k + 1, min=0)
            end = i + 1
        else:
            leader = torch.minimum(i, group_len - 1)
            start = torch.minimum(torch.clamp(leader - k // 2, min=0), group_len - k)
            end = start + k
        return (x % d == y % d) & (j >= start) & (j < end)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        rem_q, rem_k = q_idx, kv_idx
        for axis in reversed(range(len(spatial))):
            length = spatial[axis]
            x, y = rem_q % length, rem_k % length
            rem_q, rem_k = rem_q // length, rem_k // length
            term = axis_ok(x, y, length, ks[axis], dil[axis], causal[axis])
            ok = term if ok is None else ok & term
        return ok

    return mask_mod


def na_score_mod(shape: Shape, rpb: torch.Tensor):
    """FlexAttention score_mod adding the rpb table ``[heads, 2k-1, ...]`` at ``(key - query) / dilation + k - 1``
    per axis (clamped into the table: pairs outside the neighbourhood are masked by the block mask anyway)."""
    spatial, ks, dil = shape.spatial, shape.kernel_size, shape.dilation

    def score_mod(score, b, h, q_idx, kv_idx):
        offsets = []
        rem_q, rem_k = q_idx, kv_idx
        for axis in reversed(range(len(spatial))):
            length = spatial[axis]
            x, y = rem_q % length, rem_k % length
            rem_q, rem_k = rem_q // length, rem_k // length
            offsets.append(torch.clamp((y - x) // dil[axis] + ks[axis] - 1, 0, 2 * ks[axis] - 2))
        return score + rpb[tuple([h] + offsets[::-1])]

    return score_mod


@dataclass
class Result:
    shape: str
    provider: str
    dtype: str
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_kernel_ms: float | None = None  # torch.profiler: GPU kernel time per call
    fwdbwd_kernel_ms: float | None = None
    fwd_tflops: float | None = None
    fwdbwd_tflops: float | None = None
    fwd_floor_pct: float | None = None
    peak_mem_mb: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def time_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int, blocks: int = 3) -> float:
    """Milliseconds per call of `fn`: GPU time on CUDA, wall clock on CPU.

    CUDA: `blocks` blocks of `repeats` calls launched back to back between two CUDA events, with one synchronisation
    per block and none between calls, so the host's launch overhead overlaps the GPU's work wherever the GPU is the
    bottleneck; the median of the blocks' means. (Where the host is the bottleneck, small kernels, the figure is the
    launch rate; :func:`kernel_ms` gives the GPU's own time.) CPU: the median of `repeats` single calls.
    """
    for _ in range(warmup):
        fn()
    samples = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(max(1, blocks)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / repeats)
        return statistics.median(samples)
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def kernel_ms(fn: Callable[[], object], device: str, repeats: int) -> float | None:
    """GPU kernel milliseconds per call of `fn` from ``torch.profiler``: the summed durations of the device events
    (kernels, copies, memsets) of `repeats` calls, so idle gaps and host overhead are excluded; None off CUDA."""
    if device != "cuda" or repeats < 1:
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    with prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA)
    return total_us / 1e3 / repeats


def device_limits(
    device: str, dtype: torch.dtype, copy_bytes: int = 2**28, matmul_n: int = 8192
) -> tuple[float | None, float | None]:
    """Measured copy bandwidth (bytes/s) and matmul peak (FLOP/s) in `dtype`; None on CPU.

    Args:
        device: ``"cuda"`` measures; anything else returns ``(None, None)``.
        dtype: The matmul dtype.
        copy_bytes: Size of the copied buffer (read once, written once).
        matmul_n: Side of the square matmul.
    """
    if device != "cuda":
        return None, None
    src = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, 3, 10)
    bandwidth = 2 * src.numel() / (ms * 1e-3)
    a = torch.randn(matmul_n, matmul_n, device="cuda", dtype=dtype)
    ms = time_ms(lambda: a @ a, device, 3, 10)
    peak = 2 * matmul_n**3 / (ms * 1e-3)
    return bandwidth, peak


def make_inputs(shape: Shape, dtype: torch.dtype, device: str):
    q, k, v = (torch.randn(shape.batch, *shape.spatial, shape.heads, shape.head_dim, device=device, dtype=dtype,
                           requires_grad=True) for _ in range(3))
    rpb = None
    if shape.rpb:
        rpb = (torch.randn(shape.heads, *(2 * x - 1 for x in shape.kernel_size), device=device) * 0.02)
        rpb.requires_grad_()
    return q, k, v, rpb


def provider_fns(shape: Shape, provider: str, q, k, v, rpb, compile_flex: bool = True):
    """(forward callable, forward+backward callable) for one provider, or raises to skip it."""
    n = len(shape.spatial)
    na = getattr(ops, f"na{n}d")
    if provider in ("triton", "dense", "reference"):

        def fwd():
            return na(q, k, v, shape.kernel_size, dilation=shape.dilation, is_causal=shape.is_causal, rpb=rpb,
                      backend=provider)

    elif provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        tokens = shape.tokens
        block_mask = create_block_mask(na_mask_mod(shape), None, None, tokens, tokens, device=q.device)
        # A fresh compile per shape: after Dynamo's recompile limit later shapes would silently run eagerly.
        torch._dynamo.reset()
        flex = torch.compile(flex_attention) if compile_flex else flex_attention
        score_mod = na_score_mod(shape, rpb) if rpb is not None else None

        def fwd():
            qt, kt, vt = (t.reshape(shape.batch, tokens, shape.heads, shape.head_dim).transpose(1, 2)
                          for t in (q, k, v))
            return flex(qt, kt, vt, score_mod=score_mod, block_mask=block_mask)

    elif provider == "sdpa-full":

        def fwd():
            qt, kt, vt = (t.reshape(shape.batch, shape.tokens, shape.heads, shape.head_dim).transpose(1, 2)
                          for t in (q, k, v))
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

    else:
        raise ValueError(provider)
    grad = None
    leaves = [t for t in (q, k, v, rpb) if t is not None and t.requires_grad]

    def fwdbwd():
        nonlocal grad
        out = fwd()
        if grad is None:
            grad = torch.randn_like(out)
        # Gradients returned, not accumulated into .grad: back-to-back repeats add no accumulation kernels.
        return torch.autograd.grad(out, leaves, grad)

    return fwd, fwdbwd


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled so far (to tell a compiled FlexAttention row from an eager fallback)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def bench_one(shape, provider, dtype, device, limits, warmup, repeats, compile_flex: bool = True,
              blocks: int = 3) -> Result:
    res = Result(shape.name, provider, str(dtype).replace("torch.", ""))
    try:
        q, k, v, rpb = make_inputs(shape, dtype, device)
        if provider not in ("triton", "dense", "reference", "flex"):
            rpb = None
            res.note = "no rpb"
        fwd, fwdbwd = provider_fns(shape, provider, q, k, v, rpb, compile_flex)
        graphs = compiled_graphs() if provider == "flex" else 0
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with torch.no_grad():
            res.fwd_ms = time_ms(fwd, device, warmup, repeats, blocks)
            res.fwd_kernel_ms = kernel_ms(fwd, device, max(1, repeats // 4))
        res.fwdbwd_ms = time_ms(fwdbwd, device, warmup, repeats, blocks)
        res.fwdbwd_kernel_ms = kernel_ms(fwdbwd, device, max(1, repeats // 4))
        if provider == "flex":
            made = compiled_graphs() - graphs
            res.note = f"compiled ({made} graphs after dynamo reset)" if made else "EAGER: no graph compiled"
            res.note += ", rpb as score_mod (table requires grad)" if rpb is not None else ", no rpb"
        if device == "cuda":
            res.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        flops = shape.flops()
        res.fwd_tflops = flops / (res.fwd_ms * 1e-3) / 1e12
        res.fwdbwd_tflops = 3.5 * flops / (res.fwdbwd_ms * 1e-3) / 1e12
        bandwidth, peak = limits
        if bandwidth is not None:
            elem = torch.finfo(dtype).bits // 8
            moved = 4 * shape.batch * shape.tokens * shape.heads * shape.head_dim * elem  # q, k, v read; out written
            floor_s = max(moved / bandwidth, flops / peak)
            res.fwd_floor_pct = 100.0 * floor_s / (res.fwd_ms * 1e-3)
    except torch.cuda.OutOfMemoryError:
        res.note = "OOM"
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run a shape is reported, not fatal
        res.note = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return res


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(results: list[Result], meta: dict) -> str:
    lines = [
        (
            f"Device: {meta['device_name']}; torch {meta['torch']}; triton {meta['triton']}; date {meta['date']}; "
            f"command `{meta['command']}`."
        ),
        "",
        (
            "| shape | provider | dtype | fwd ms | fwd+bwd ms | fwd kernel ms | fwd+bwd kernel ms | fwd TFLOP/s "
            "| fwd+bwd TFLOP/s | fwd % of floor | peak MB | note |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.shape} | {r.provider} | {r.dtype} | {_fmt(r.fwd_ms, '.3f')} | {_fmt(r.fwdbwd_ms, '.3f')} | "
            f"{_fmt(r.fwd_kernel_ms, '.3f')} | {_fmt(r.fwdbwd_kernel_ms, '.3f')} | {_fmt(r.fwd_tflops, '.3g')} | "
            f"{_fmt(r.fwdbwd_tflops, '.3g')} | {_fmt(r.fwd_floor_pct, '.1f')} | "
            f"{_fmt(r.peak_mem_mb, '.1f')} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--providers", default=None, help="comma list of triton,dense,reference,flex,sdpa-full")
    parser.add_argument("--interpreter", action="store_true", help="on CPU, also run the kernels in the interpreter")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.interpreter:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
    dtype = getattr(torch, args.dtype)
    if args.device == "cpu":
        dtype = torch.float32 if args.dtype == "float16" else dtype
        providers = ["reference"] + (["triton"] if args.interpreter else [])
    else:
        providers = ["triton", "dense", "reference", "flex", "sdpa-full"]
    if args.providers:
        providers = args.providers.split(",")
    shapes = quick_shapes() if args.quick or args.device == "cpu" else full_shapes()
    warmup = args.warmup if args.warmup is not None else (1 if args.device == "cpu" else 10)
    repeats = args.repeats if args.repeats is not None else (3 if args.device == "cpu" else 30)
    limits = device_limits(args.device, dtype)
    import triton

    meta = {
        "device_name": (
            torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
        ),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_op.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "bandwidth_GBps": None if limits[0] is None else limits[0] / 1e9,
        "matmul_peak_TFLOPs": None if limits[1] is None else limits[1] / 1e12,
    }
    results = []
    os.makedirs(args.out, exist_ok=True)
    for shape in shapes:
        for provider in providers:
            r = bench_one(shape, provider, dtype, args.device, limits, warmup, repeats)
            results.append(r)
            print(f"{r.shape:40s} {r.provider:11s} fwd {_fmt(r.fwd_ms, '9.3f')} ms  fwd+bwd "
                  f"{_fmt(r.fwdbwd_ms, '9.3f')} ms  {_fmt(r.fwd_tflops, '7.2f')} TFLOP/s  {r.note}", flush=True)
            with open(os.path.join(args.out, "bench_op.json"), "w") as f:
                json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=1)
            with open(os.path.join(args.out, "bench_op.md"), "w") as f:
                f.write(markdown(results, meta))
    print()
    print(markdown(results, meta))
    return results


if __name__ == "__main__":
    main()
