"""Checks every entry of every kernel's GPU search space, one forced config at a time, against float64.

``full`` autotuning may pick any entry of ``tiling.search_space`` for a kernel; this module enumerates them all as
:class:`Case` objects (forward; dQ without rpb, with the atomic rpb gradient and with the deterministic one; dK/dV;
with and without rpb; bfloat16, float16 and float32; one head dim per head-dim class) and runs one case on a small
problem with exactly that config forced (:func:`tiling.force_config`: no autotuning, no autotuning cache), comparing
the outputs and gradients with the reference backend run in float64 on float64 copies of the same inputs (a
gather-based implementation that shares no code with the kernels).

Compiled binaries: Triton specialises a kernel on its ``constexpr`` arguments, on integer arguments equal to 1
(made constants) and on integers and pointers divisible by 16 (an alignment hint). Batch and heads are plain integer
arguments (autotuning-key values, not ``constexpr``), so a check at batch :func:`check_batch` (``timed``) compiles
the binary that a timed run at batch ``timed`` launches with the same config, provided the map, heads, head dim,
window, dtypes and gradient flags are the timed ones (pass the timed layer as `shape`). Offsets switch to 64-bit
only when a tensor reaches 2**31 elements, which a check batch never does; that is the one exception.

Under ``TRITON_INTERPRET=1`` the same API runs on CPU tensors (the interpreter ignores warps, stages and register
caps but runs the tile shapes of the entry).

Example:
    >>> from natzoo.ops.neighborhood.triton import configcheck
    >>> rows = [configcheck.run_case(c) for c in configcheck.cases(ranks=(2,), dtypes=(torch.bfloat16,))]
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import zlib
from collections.abc import Iterable, Iterator

import torch

from ..dispatch import interpreter_enabled
from . import tiling
from .forward import dot_precision

# Kernel variants: the kernel whose entry is varied, whether rpb is present (and, for dQ, needs a gradient) and the
# d_rpb reduction. Deterministic mode always uses the first dQ entry (autotuning is off there).
VARIANTS = ("fwd", "fwd-rpb", "dq", "dq-rpb-atomic", "dq-rpb-deterministic", "dkdv", "dkdv-rpb")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HEAD_DIMS = (32, 64, 128, 256)  # one per head-dim class
OUTPUTS = ("out", "lse", "dq", "dk", "dv", "d_rpb")

# (out/lse atol = rtol, dq/dk/dv atol = rtol, d_rpb relative L2) against float64, as in tests/test_triton.py.
TOLERANCE = {
    "ieee": (1e-5, 1e-4, 1e-5),
    "tf32": (2e-3, 1e-2, 5e-3),
    torch.float16: (2e-3, 1e-2, 5e-3),
    torch.bfloat16: (1.6e-2, 5e-2, 2e-2),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """The problem a case runs on: ``[batch, *spatial, heads, head_dim]`` with its window arguments."""

    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    heads: int = 2
    batch: int = 2

    @property
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def label(self) -> str:
        def join(values):
            return "x".join(str(int(v)) for v in values)

        return (f"B{self.batch} L{join(self.spatial)} H{self.heads} k{join(self.kernel_size)} d{join(self.dilation)}"
                f" c{join(self.is_causal)}")


# Small default problems: several query and key tiles, partly filled ones, a dilation not dividing the length and a
# causal axis, for the GPU tiles (up to 64 rows).
DEFAULT_SHAPES = {
    1: Shape((45,), (7,), (2,), (False,)),
    2: Shape((18, 21), (7, 7), (1, 2), (False, False)),
    3: Shape((6, 9, 11), (3, 3, 5), (1, 2, 1), (False, True, False)),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel config to check: `variant` (see ``VARIANTS``) runs with ``entry`` forced on its kernel."""

    variant: str
    index: int  # position of `entry` in the kernel's search space
    entry: tiling.Entry
    dtype: torch.dtype
    head_dim: int
    shape: Shape

    @property
    def kernel(self) -> str:
        return self.variant.split("-")[0]

    @property
    def rpb(self) -> bool:
        return "rpb" in self.variant

    @property
    def deterministic(self) -> bool:
        return self.variant.endswith("deterministic")

    @property
    def backward(self) -> bool:
        return self.kernel != "fwd"

    @property
    def config(self) -> str:
        """The entry as ``q2x8x1 k2x16x1 w1 s1 r168`` (query tile, key tile, warps, stages, register cap)."""
        tq, tk, warps, stages, *cap = self.entry
        text = f"q{'x'.join(map(str, tq))} k{'x'.join(map(str, tk))} w{warps} s{stages}"
        return text + (f" r{cap[0]}" if cap else "")

    @property
    def name(self) -> str:
        """e.g. ``dq-rpb-atomic n2 bf16 d32 #0 q2x8x1 k8x4x1 w1 s1``."""
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]
        return f"{self.variant} n{self.shape.rank} {dtype} d{self.head_dim} #{self.index} {self.config}"


def check_batch(timed_batch: int) -> int:
    """The smallest batch that Triton specialises like `timed_batch` (1 stays 1, multiples of 16 give 16, else 2)."""
    if timed_batch < 1:
        raise ValueError(f"check_batch: timed_batch must be >= 1, got {timed_batch}")
    return 1 if timed_batch == 1 else 16 if timed_batch % 16 == 0 else 2


def cases(
    variants: Iterable[str] = VARIANTS,
    ranks: Iterable[int] = (1, 2, 3),
    dtypes: Iterable[torch.dtype] = DTYPES,
    head_dims: Iterable[int] = HEAD_DIMS,
    shapes: dict[int, Shape] | None = None,
) -> list[Case]:
    """Every (variant, rank, dtype, head dim, search-space entry) to check, in that nesting order.

    Args:
        variants: Subset of ``VARIANTS``.
        ranks: Spatial ranks.
        dtypes: Input dtypes (bfloat16, float16, float32).
        head_dims: Head dims; each stands for its class's search space (``tiling.head_dim_class``).
        shapes: Problem per rank (default ``DEFAULT_SHAPES``); pass the timed layer with ``batch=check_batch(...)``
            to check the binaries a timed run launches.
    """
    shapes = {**DEFAULT_SHAPES, **(shapes or {})}
    out = []
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"cases: variant must be one of {VARIANTS}, got {variant!r}")
        kernel = variant.split("-")[0]
        for rank in ranks:
            shape = shapes[rank]
            for dtype in dtypes:
                if dtype not in DTYPES:
                    raise ValueError(f"cases: dtype must be one of {DTYPES}, got {dtype}")
                for head_dim in head_dims:
                    space = tiling.search_space(kernel, rank, head_dim)
                    for index, entry in enumerate(space):
                        if variant.startswith("dq-rpb") and not tiling.rpb_products_ok(entry[0], entry[1], rank):
                            continue  # pruned whenever rpb needs a gradient, so autotuning never runs it
                        if variant == "dq-rpb-deterministic" and index > 0:
                            continue  # deterministic mode always runs the first entry
                        out.append(Case(variant, index, entry, dtype, head_dim, shape))
    return out


@contextlib.contextmanager
def _pinned(case: Case) -> Iterator[None]:
    """Forces `case.entry` on its kernel and the first search-space entry on every other kernel the case runs."""
    with contextlib.ExitStack() as stack:
        for kind in tiling.KINDS:
            if kind == case.kernel:
                entry = case.entry
            else:
                entry = tiling.search_space(kind, case.shape.rank, case.head_dim)[0]
            stack.enter_context(tiling.force_config(kind, entry))
        if case.deterministic:
            previous = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            stack.callback(torch.use_deterministic_algorithms, previous)
        yield


def _inputs(case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    """Seeded (by the case's problem, not its config) q, k, v, rpb and output gradient in float32 on `device`."""
    shape = case.shape
    seed = zlib.crc32(f"{shape.label} {case.head_dim} {case.rpb}".encode())
    gen = torch.Generator().manual_seed(seed)
    full = (shape.batch, *shape.spatial, shape.heads, case.head_dim)
    tensors = {name: torch.randn(full, generator=gen) for name in ("q", "k", "v", "grad_out")}
    if case.rpb:
        tensors["rpb"] = torch.randn(shape.heads, *(2 * k - 1 for k in shape.kernel_size), generator=gen) * 0.5
    return {name: t.to(device) for name, t in tensors.items()}


def _run_op(case: Case, tensors: dict[str, torch.Tensor], dtype: torch.dtype, backend: str) -> dict[str, torch.Tensor]:
    """out, lse and (for backward cases) the gradients of ``<out, grad_out>`` in `dtype` (rpb stays float32/64)."""
    from .. import functional

    shape = case.shape
    leaves = {name: tensors[name].to(dtype).requires_grad_(case.backward) for name in ("q", "k", "v")}
    rpb = None
    if case.rpb:
        rpb_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        rpb = tensors["rpb"].to(rpb_dtype).requires_grad_(case.backward)
        leaves["rpb"] = rpb
    fn = getattr(functional, f"na{shape.rank}d")
    with torch.set_grad_enabled(case.backward):
        out, lse = fn(leaves["q"], leaves["k"], leaves["v"], shape.kernel_size, dilation=shape.dilation,
                      is_causal=shape.is_causal, rpb=rpb, return_lse=True, backend=backend)
    result = {"out": out.detach(), "lse": lse.detach()}
    if case.backward:
        wanted = [name for name, t in leaves.items() if t.requires_grad]
        loss = (out * tensors["grad_out"].to(out.dtype)).sum()
        grads = torch.autograd.grad(loss, [leaves[name] for name in wanted])
        names = {"q": "dq", "k": "dk", "v": "dv", "rpb": "d_rpb"}
        result.update({names[name]: g for name, g in zip(wanted, grads)})
    return result


def tolerance(case: Case) -> tuple[float, float, float]:
    """(out/lse atol = rtol, dq/dk/dv atol = rtol, d_rpb relative L2) for the case's dtype and fp32 precision."""
    if case.dtype == torch.float32:
        return TOLERANCE[dot_precision(torch.float32)]
    return TOLERANCE[case.dtype]


def run_case(case: Case, device: torch.device | str | None = None) -> dict:
    """Runs `case` with its config forced and compares it with the float64 reference.

    Args:
        case: From :func:`cases`.
        device: Default: CUDA if available, else CPU (which needs ``TRITON_INTERPRET=1``).

    Returns:
        A row: ``name``, ``variant``, ``kernel``, ``index``, ``config``, ``rank``, ``dtype``, ``head_dim``, ``shape``,
        ``precision``, ``tol_out``, ``tol_grad``, ``tol_rpb``, per output ``<o>_max_abs`` and ``<o>_max_rel`` (max
        abs error over max abs reference value; outputs ``out``, ``lse`` and for backward cases ``dq``, ``dk``,
        ``dv`` and ``d_rpb``), ``d_rpb_rel_l2``, ``passed``, ``error`` (the exception text of a failed compile or
        launch, else None) and ``seconds``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError("configcheck.run_case on CPU needs TRITON_INTERPRET=1 (set before importing triton)")
    tol_out, tol_grad, tol_rpb = tolerance(case)
    row: dict = {"name": case.name, "variant": case.variant, "kernel": case.kernel, "index": case.index,
                 "config": case.config, "rank": case.shape.rank, "dtype": str(case.dtype).removeprefix("torch."),
                 "head_dim": case.head_dim, "shape": case.shape.label,
                 "precision": dot_precision(case.dtype) if case.dtype == torch.float32 else "-",
                 "tol_out": tol_out, "tol_grad": tol_grad, "tol_rpb": tol_rpb}
    start = time.perf_counter()
    tensors = _inputs(case, device)
    try:
        with _pinned(case):
            got = _run_op(case, tensors, case.dtype, "triton")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a compile or launch failure is this case's result, not the end
        row.update(passed=False, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - start)
        return row
    want = _run_op(case, tensors, torch.float64, "reference")
    passed = True
    for name in OUTPUTS:
        if name not in got:
            continue
        g, w = got[name].double(), want[name].double()
        diff = (g - w).abs()
        finite = bool(torch.isfinite(g).all())
        max_abs = diff.max().item() if finite else math.inf
        row[f"{name}_max_abs"] = max_abs
        row[f"{name}_max_rel"] = max_abs / max(w.abs().max().item(), 1e-30)
        if name == "d_rpb":
            rel_l2 = ((g - w).norm() / w.norm().clamp_min(1e-30)).item() if finite else math.inf
            row["d_rpb_rel_l2"] = rel_l2
            passed &= rel_l2 <= tol_rpb
        else:
            tol = tol_out if name in ("out", "lse") else tol_grad
            passed &= finite and bool((diff <= tol + tol * w.abs()).all())
    row.update(passed=passed, error=None, seconds=time.perf_counter() - start)
    return row
