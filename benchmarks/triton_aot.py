"""Ahead-of-time compilation of the project's Triton kernels for an NVIDIA target, without a GPU.

Shared by ``aot_compile_check.py`` and ``static_cost.py``. The launches are captured from the real launchers
(``na_forward`` / ``na_backward``) run on ``meta`` tensors, so every kernel argument, grid and autotuning config is
exactly what a real call passes; the arguments are then specialised by Triton's own JIT binder (ints equal to 1
become constants, ints and pointers divisible by 16 get the divisibility hint), as a real launch on the GPU would.
SASS statistics come from ``cuobjdump`` (shipped with Triton) run on the compiled cubin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import triton

from natzoo.ops.neighborhood.triton import compat


@dataclasses.dataclass
class Launch:
    """One captured kernel launch: the kernel (a ``JITFunction``), its autotuning configs after the autotuner's
    pruning (None: a plain launch) and its arguments."""

    kernel: Any
    configs: list[triton.Config] | None
    args: tuple
    kwargs: dict
    grid: Callable | tuple

    @property
    def name(self) -> str:
        return compat.python_function(self.kernel).__name__

    def named_args(self, config: triton.Config | None) -> dict:
        named = dict(zip(compat.arg_names(self.kernel), self.args))
        named.update(self.kwargs)
        if config is not None:
            named.update(config.kwargs)
        return named

    def grid_size(self, config: triton.Config | None) -> tuple[int, int, int]:
        grid = self.grid(self.named_args(config)) if callable(self.grid) else self.grid
        grid = tuple(int(size) for size in grid)
        return grid + (1,) * (3 - len(grid))

    def programs(self, config: triton.Config | None) -> int:
        g0, g1, g2 = self.grid_size(config)
        return g0 * g1 * g2

    def options(self, config: triton.Config | None) -> dict:
        if config is None:
            return {k: self.kwargs[k] for k in ("num_warps", "num_stages") if k in self.kwargs}
        return {"num_warps": config.num_warps, "num_stages": config.num_stages}


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Records (instead of running) every ``kernel[grid](...)`` launch made inside the block."""
    launches: list[Launch] = []

    def record(kernel: Any, args: tuple, kwargs: dict, configs: list[Any] | None, grid: Any) -> None:
        launches.append(Launch(compat.unwrap(kernel), configs, args, kwargs, grid))

    with compat.intercepted_launches(record):
        yield launches


def compile_launch(launch: Launch, config: triton.Config | None, arch: int = 90):
    """Compiles one launch (with one of its configs) for ``sm_<arch>`` with the JIT's specialisation."""
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
    return compat.compile_for(launch.kernel, launch.args, kwargs, arch)


def _tool(name: str) -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else (shutil.which(name) or name)


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")


@dataclasses.dataclass
class SassStats:
    """Static facts about one compiled kernel (sm_90 SASS)."""

    registers: int
    shared_bytes: int
    local_bytes: int
    spill_stores: int
    spill_loads: int
    instructions: int
    loops: list[tuple[int, int]]  # (first instruction index, instruction count) per loop, in code order
    loop_spills: int = 0  # STL/LDL instructions inside the main loop (the first loop in code order)

    @property
    def main_loop(self) -> int:
        """Instructions in the body of the first loop in code order, the kernels' main loop (0 without a loop).

        Later loops are the reruns that only tiles with non-finite rows execute.
        """
        return self.loops[0][1] if self.loops else 0


def sass_stats(compiled) -> SassStats:
    """Registers, shared/local memory, spill instructions, SASS size and loop bodies of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], check=True, capture_output=True, text=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], check=True, capture_output=True,
                               text=True).stdout
    fields = dict(re.findall(r"(REG|SHARED|LOCAL):(\d+)", usage))
    addresses, ops = [], []
    for match in _INSTR.finditer(sass):
        addresses.append(int(match.group(1), 16))
        ops.append(match.group(2).strip())
    index_of = {addr: i for i, addr in enumerate(addresses)}
    loops = []
    for i, op in enumerate(ops):
        branch = _BRANCH.search(op)
        if branch and branch.group(1):
            target = int(branch.group(1), 16)
            if target <= addresses[i] and target in index_of:
                loops.append((index_of[target], i - index_of[target] + 1))
    loops.sort()
    loops = [loop for loop in loops if loop[1] > 2]  # drops the trailing `BRA self` of the exit padding
    first, count = loops[0] if loops else (0, 0)
    loop_spills = sum(1 for op in ops[first:first + count] if re.search(r"\b(STL|LDL)\b", op))
    # `EXIT`-terminated padding (`BRA` to itself, NOPs) is not code that runs.
    body = [op for op in ops if not op.startswith("NOP")]
    return SassStats(
        registers=int(fields.get("REG", 0)),
        shared_bytes=max(int(fields.get("SHARED", 0)), int(compiled.metadata.shared)),
        local_bytes=int(fields.get("LOCAL", 0)),
        spill_stores=sum(1 for op in ops if re.search(r"\bSTL\b", op)),
        spill_loads=sum(1 for op in ops if re.search(r"\bLDL\b", op)),
        instructions=len(body),
        loops=loops,
        loop_spills=loop_spills,
    )
