"""Compiles the Triton NA kernels ahead of time for an NVIDIA target without a GPU (frontend, LLVM, ptxas).

Catches GPU-only errors that the CPU interpreter cannot (``tl.dot`` shape rules, type errors, shared memory over
the H100's 227 KiB) for every autotuning config, rotating dtype and head-dim block over them.

Usage::

    python benchmarks/aot_compile_check.py            # one config per rank, quick
    python benchmarks/aot_compile_check.py --all      # every GPU config of tiling._GPU_CONFIGS
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from natzoo.ops.neighborhood.triton import backward, forward
from natzoo.ops.neighborhood.triton.tiling import _GPU_CONFIGS

SMEM_LIMIT = 227 * 1024
TENSOR_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
FLOAT32_ARGS = {"RPB", "LSE", "DELTA", "TABLE"}

GEOMETRY = {  # one awkward geometry per rank: even kernels, stride, causal axes
    1: {"K0": 7, "K1": 1, "K2": 1, "S0": 1, "S1": 1, "S2": 1, "C0": False, "C1": False, "C2": False},
    2: {"K0": 7, "K1": 6, "K2": 1, "S0": 1, "S1": 2, "S2": 1, "C0": False, "C1": True, "C2": False},
    3: {"K0": 3, "K1": 7, "K2": 7, "S0": 1, "S1": 1, "S2": 2, "C0": True, "C1": False, "C2": False},
}


def signature(fn, dtype: str, consts: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in TENSOR_ARGS:
            sig[name] = "*" + dtype
        elif name in FLOAT32_ARGS:
            sig[name] = "*fp32"
        elif name.startswith("scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(fn, dtype: str, consts: dict, warps: int, stages: int, target: GPUTarget):
    source = ASTSource(fn=fn, signature=signature(fn, dtype, consts),
                       constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(source, target=target, options={"num_warps": warps, "num_stages": stages})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every autotuning config, not one per rank")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    combos = [("fp16", 128), ("bf16", 64), ("fp32", 32), ("fp16", 256), ("bf16", 128)]
    failures = 0
    kernels = (("fwd", forward._na_fwd_kernel), ("dq", backward._na_bwd_dq_kernel),
               ("dkdv", backward._na_bwd_dkdv_kernel))
    for rank, cfgs in _GPU_CONFIGS.items():
        plan = [(c, combos[i % len(combos)]) for i, c in enumerate(cfgs)] if args.all else [(cfgs[0], ("fp16", 32))]
        for (tq, tk, warps, stages), (dtype, block_d) in plan:
            consts = dict(GEOMETRY[rank], HAS_RPB=True, BLOCK_D=block_d, UPCAST=False,
                          PRECISION="ieee" if dtype == "fp32" else "tf32",
                          TQ0=tq[0], TQ1=tq[1], TQ2=tq[2], TK0=tk[0], TK1=tk[1], TK2=tk[2])
            for name, fn in kernels:
                label = f"{name:5s} rank{rank} {dtype} D{block_d} tq{tq} tk{tk} w{warps} s{stages}"
                t0 = time.time()
                try:
                    smem = compile_kernel(fn, dtype, consts, warps, stages, target).metadata.shared
                except Exception as exc:  # noqa: BLE001 - report every failing config, then fail at the end
                    failures += 1
                    print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                status = "ok  " if smem <= SMEM_LIMIT else "SMEM"
                failures += status != "ok  "
                print(f"{status} {label}: {time.time() - t0:.1f}s shared={smem} B", flush=True)
    for dtype, kernel in itertools.product(("fp16", "fp32"), ((7, 7, 1), (3, 7, 7))):
        table = (2 * kernel[0] - 1) * (2 * kernel[1] - 1) * (2 * kernel[2] - 1)
        for det in (False, True):
            consts = {"K0": kernel[0], "K1": kernel[1], "K2": kernel[2], "C0": False, "C1": True, "C2": False,
                      "BLOCK_D": 32, "BLOCK_Q": 32, "BLOCK_R": triton.next_power_of_2(table), "DETERMINISTIC": det}
            try:
                compile_kernel(backward._na_bwd_drpb_kernel, dtype, consts, 4, 2, target)
                print(f"ok   drpb {dtype} k{kernel} deterministic={det}", flush=True)
            except Exception as exc:  # noqa: BLE001
                failures += 1
                print(f"FAIL drpb {dtype} k{kernel} deterministic={det}: {type(exc).__name__}: {str(exc)[:300]}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
