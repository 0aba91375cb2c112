"""Compiles the Triton NA kernels ahead of time for an NVIDIA target without a GPU (frontend, LLVM, ptxas).

Catches GPU-only errors that the CPU interpreter cannot (``tl.dot`` shape rules, layouts, type errors, shared memory
over the H100's 227 KiB) for every autotuning config. The launches are captured from the real launchers on ``meta``
tensors for a set of problems (1-D/2-D/3-D, NAT/DiNAT layers in the modules' fused-qkv layout, causal, stride,
dilation, even kernels, padded head dims, every gradient subset, deterministic mode, a gradient into lse), and each
is compiled with the specialisation a real call gets (ints equal to 1 become constants, ints and pointers divisible
by 16 carry the hint; see ``triton_aot.py``).

Usage::

    python benchmarks/aot_compile_check.py            # the first config of every launch (NATZOO_NA_AUTOTUNE=off)
    python benchmarks/aot_compile_check.py --all      # every config of the full search space
    python benchmarks/aot_compile_check.py --arch 80  # another compute capability
    python benchmarks/aot_compile_check.py --only 1d --only 3d   # the cases whose name contains either text
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, never the interpreter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from natzoo.ops.neighborhood.triton.backward import na_backward
from natzoo.ops.neighborhood.triton.forward import na_forward
from natzoo.ops.neighborhood.validation import Problem
from triton_aot import capture_launches, compile_launch, sass_stats

SMEM_LIMIT = 227 * 1024


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...] | None = None
    dilation: tuple[int, ...] | None = None
    causal: tuple[bool, ...] | None = None
    heads: int = 2
    head_dim: int = 32
    dtype: torch.dtype = torch.bfloat16
    rpb: bool = True
    layout: str = "qkv"  # the modules' fused projection views, or "transposed" ([B, H, *S, D] moved)
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True)
    deterministic: bool = False
    grad_lse: bool = False
    batch: int = 2


CASES = [
    Case("nat 56x56 k7", (56, 56), (7, 7)),
    Case("dinat 56x56 k7 d8", (56, 56), (7, 7), dilation=(8, 8)),
    Case("nat 7x7 h16 (L = k)", (7, 7), (7, 7), heads=16),
    Case("2d mixed stride/dilation/causal fp16", (57, 43), (7, 6), stride=(1, 2), dilation=(2, 3),
         causal=(False, True), head_dim=64, dtype=torch.float16, rpb=False, grad_lse=True),
    Case("2d hd48 (padded head dim) fp32 k5", (33, 31), (5, 5), head_dim=48, dtype=torch.float32),
    Case("2d hd128 k13", (64, 64), (13, 13), heads=8, head_dim=128, rpb=False, layout="transposed"),
    Case("1d k13 d3 fp16", (1000,), (13,), dilation=(3,), head_dim=64, dtype=torch.float16),
    Case("1d causal stride hd128", (777,), (8,), stride=(3,), dilation=(2,), causal=(True,), heads=3,
         head_dim=128, rpb=False),
    Case("3d mixed rpb", (9, 17, 19), (3, 5, 4), dilation=(1, 2, 3), causal=(True, False, False), head_dim=64),
    Case("3d stride hd128 fp32", (8, 16, 16), (3, 7, 7), stride=(1, 2, 3), head_dim=128, dtype=torch.float32,
         rpb=False),
    Case("nat: q frozen", (28, 28), (7, 7), heads=4, needs=(False, True, True, True)),
    Case("nat: rpb frozen", (28, 28), (7, 7), heads=4, needs=(True, True, True, False)),
    Case("nat: only rpb", (28, 28), (7, 7), heads=4, needs=(False, False, False, True)),
    Case("nat: only v", (28, 28), (7, 7), heads=4, needs=(False, False, True, False)),
    Case("nat deterministic", (14, 14), (7, 7), heads=8, deterministic=True),
    Case("3d deterministic", (9, 17, 19), (3, 5, 4), dilation=(1, 2, 3), head_dim=64, deterministic=True),
    # The fused qkv of 4000 images spans more than 2**31 elements: 64-bit offsets (WIDE) and a folded batch grid.
    Case("nat 56x56 k7 int64 offsets B4000", (56, 56), (7, 7), batch=4000),
]


def problem_of(case: Case) -> Problem:
    n = len(case.spatial)
    return Problem(f"na{n}d", n, case.batch, case.spatial, case.heads, case.head_dim, case.kernel, case.stride or (1,) * n,
                   case.dilation or (1,) * n, case.causal or (False,) * n, case.head_dim**-0.5, case.dtype,
                   torch.device("meta"))


def inputs(case: Case, problem: Problem):
    shape = (problem.batch, *case.spatial, case.heads, case.head_dim)
    if case.layout == "qkv":
        qkv = torch.empty(*shape[:-2], 3 * case.heads * case.head_dim, device="meta", dtype=case.dtype)
        return qkv.unflatten(-1, (3, case.heads, case.head_dim)).unbind(-3)
    return [torch.empty(shape[0], case.heads, *case.spatial, case.head_dim, device="meta",
                        dtype=case.dtype).movedim(1, -2) for _ in range(3)]


def launches_of(case: Case) -> list:
    problem = problem_of(case)
    q, k, v = inputs(case, problem)
    rpb = torch.empty(case.heads, *(2 * x - 1 for x in case.kernel), device="meta") if case.rpb else None
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(case.deterministic)  # the autotuning mode follows it, as in a real call
    try:
        with capture_launches() as launches:
            out, lse = na_forward(problem, q, k, v, rpb)
            grad_lse = torch.empty_like(lse) if case.grad_lse else None
            na_backward(problem, torch.empty_like(out), grad_lse, q, k, v, rpb, out, lse, case.deterministic,
                        case.needs)
    finally:
        torch.use_deterministic_algorithms(previous)
    return launches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every config of the full search space")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--only", action="append", default=[],
                        help="only the cases whose name contains this text (repeatable: any of them)")
    args = parser.parse_args(argv)
    os.environ["NATZOO_NA_AUTOTUNE"] = "full" if args.all else "off"
    failures, compiled, seen = 0, 0, set()
    for case in CASES:
        if args.only and not any(text in case.name for text in args.only):
            continue
        for launch in launches_of(case):
            for config in launch.configs or [None]:
                key = (launch.name, case.dtype, case.layout, repr(sorted(launch.named_args(config).items(),
                                                                         key=lambda kv: kv[0])))
                label = f"{launch.name.strip('_'):20s} {case.name:38s} {_config(config)}"
                if key in seen:
                    continue
                seen.add(key)
                t0 = time.time()
                try:
                    stats = sass_stats(compile_launch(launch, config, args.arch))
                except Exception as exc:  # noqa: BLE001 - report every failing config, then fail at the end
                    failures += 1
                    print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                    continue
                compiled += 1
                status = "ok  " if stats.shared_bytes <= SMEM_LIMIT and not stats.local_bytes else "WARN"
                failures += stats.shared_bytes > SMEM_LIMIT
                wide = launch.named_args(config).get("WIDE")
                print(f"{status} {label} {time.time() - t0:4.1f}s regs={stats.registers} smem={stats.shared_bytes} "
                      f"local={stats.local_bytes} wide={wide}", flush=True)
    print(f"{compiled} compiled, {failures} failure(s)")
    return 1 if failures else 0


def _config(config) -> str:
    if config is None:
        return "-"
    kw = config.kwargs
    tq = "x".join(str(kw[f"TQ{i}"]) for i in range(3))
    tk = "x".join(str(kw[f"TK{i}"]) for i in range(3))
    return f"q{tq} k{tk} w{config.num_warps} s{config.num_stages}"


if __name__ == "__main__":
    sys.exit(main())
