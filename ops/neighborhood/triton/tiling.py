"""Tile configurations, autotuning modes and the in-kernel window arithmetic shared by the kernels.

Every kernel works on three spatial axes. A 1-D or 2-D problem is padded to three axes with dummy axes of length 1,
kernel 1, stride 1, dilation 1 and no causal mask (so window ``[0, 1)`` and rpb extent 1); their strides are 0.

A config is ``(query tile, key tile, warps, stages)``; each tile is a box ``(T0, T1, T2)`` of in-group indices of one
dilation group, flattened row-major into the rows (or columns) of a Triton block. The program's own tile is the query
tile in the forward and dQ kernels and the key tile in the dK/dV kernel; the other one is the sub-tile its loop walks
over the halo (or inverse-neighbourhood) box. A sub-tile one wide on an axis makes that axis a scalar per loop trip,
so its window test costs one check per row instead of one per score slot. See docs/kernels.md.

Autotuning is per kernel, keyed on everything that changes the best config or the result: batch, heads, map,
dilation, head dim, window, stride, causal flags, rpb and gradient flags, input dtypes. ``NATZOO_NA_AUTOTUNE``
restricts the search: ``full`` (default), ``quick`` (the first two configs) or ``off`` (the first config only).
Under ``torch.use_deterministic_algorithms(True)`` the first config is always used, so results are
bit-reproducible across processes, not only within one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ..dispatch import interpreter_enabled as interpreting
from .compat import arg_names, check_versions, patch_interpreter_scalars

Tile = tuple[int, int, int]
Entry = tuple  # (query tile, key tile, warps, stages[, register cap])

ENV_AUTOTUNE = "NATZOO_NA_AUTOTUNE"
AUTOTUNE_MODES = ("full", "quick", "off")
KINDS = ("fwd", "dq", "dkdv")
HEAD_DIM_CLASSES = (32, 64, 128, 256)

# Base-conversion constants of the kernels (they work with exp2/log2 and return natural-log lse).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# GPU search spaces per kernel and rank, best first by the static cost model (docs/benchmarks.md); quick mode takes
# the first two, deterministic mode the first. Small NAT windows (k=7) want 16-row query tiles on one warp (each
# warp owns 16 rows, so row reductions stay inside the warp): a 2x8 tile has an 8x14 halo, walked in 2x16, 8x4 or
# 2x8 key sub-tiles (128 score slots per query, 49 useful); 2x8 sub-tiles fit DiNAT's 7x7 dilation groups. dQ
# configs need outer and inner tile products >= 16 to reduce the rpb gradient with tensor-core products (see
# `rpb_partial`); the others are pruned when that gradient is needed. A fifth entry caps the registers per thread:
# the rerun path for non-finite rows needs more than the main loop, and the cap keeps enough one-warp programs
# resident (the main loop then spills a little or not at all, see docs/benchmarks.md).
_CONFIGS_32: dict[str, dict[int, list[Entry]]] = {
    "fwd": {
        1: [((16, 1, 1), (32, 1, 1), 1, 1), ((16, 1, 1), (16, 1, 1), 1, 2), ((32, 1, 1), (32, 1, 1), 2, 1),
            ((64, 1, 1), (32, 1, 1), 4, 1), ((64, 1, 1), (64, 1, 1), 4, 2)],
        2: [((2, 8, 1), (2, 16, 1), 1, 1, 168), ((2, 8, 1), (2, 8, 1), 1, 2, 128), ((8, 8, 1), (4, 8, 1), 4, 2, 128),
            ((2, 8, 1), (2, 16, 1), 2, 1), ((4, 8, 1), (2, 16, 1), 1, 1), ((8, 8, 1), (2, 16, 1), 4, 1),
            ((4, 4, 1), (2, 8, 1), 1, 2)],
        3: [((1, 2, 8), (1, 2, 16), 1, 1), ((1, 2, 8), (1, 2, 8), 1, 2), ((1, 4, 8), (1, 2, 16), 2, 1),
            ((2, 2, 4), (1, 4, 8), 1, 1), ((1, 8, 8), (1, 2, 16), 4, 1)],
    },
    "dq": {
        1: [((16, 1, 1), (32, 1, 1), 1, 1), ((16, 1, 1), (16, 1, 1), 1, 2), ((32, 1, 1), (32, 1, 1), 2, 1),
            ((64, 1, 1), (32, 1, 1), 4, 1), ((64, 1, 1), (64, 1, 1), 4, 2)],
        2: [((2, 8, 1), (8, 4, 1), 1, 1), ((4, 8, 1), (4, 4, 1), 1, 1), ((4, 8, 1), (4, 8, 1), 1, 1),
            ((8, 8, 1), (4, 4, 1), 4, 1), ((2, 8, 1), (8, 8, 1), 1, 1), ((2, 8, 1), (2, 16, 1), 1, 1)],
        3: [((1, 2, 8), (1, 8, 4), 1, 1), ((1, 4, 4), (1, 4, 4), 1, 1), ((1, 2, 8), (2, 4, 4), 1, 1),
            ((2, 2, 4), (1, 8, 4), 1, 1), ((1, 2, 8), (1, 2, 16), 1, 1)],
    },
    "dkdv": {  # (query sub-tile, key tile = the program's tile)
        1: [((32, 1, 1), (16, 1, 1), 1, 1), ((16, 1, 1), (16, 1, 1), 1, 2), ((32, 1, 1), (32, 1, 1), 2, 1),
            ((32, 1, 1), (64, 1, 1), 4, 1), ((64, 1, 1), (64, 1, 1), 4, 2)],
        2: [((2, 8, 1), (2, 8, 1), 1, 1, 128), ((2, 8, 1), (4, 8, 1), 2, 1), ((1, 16, 1), (4, 8, 1), 2, 1),
            ((1, 16, 1), (2, 8, 1), 1, 1), ((2, 8, 1), (4, 4, 1), 1, 1), ((2, 8, 1), (8, 8, 1), 4, 1)],
        3: [((1, 2, 8), (1, 2, 8), 1, 1), ((1, 1, 16), (1, 2, 8), 1, 1), ((1, 2, 8), (1, 4, 8), 2, 1),
            ((1, 2, 16), (1, 2, 8), 1, 1)],
    },
}

# Search spaces per head-dim class (the smallest class holding the head dim; see `head_dim_class`). Larger head dims
# hold larger accumulators and K/V sub-tiles per program: the tables of the larger classes trade rows per warp or key
# sub-tile width for registers so that the main loops do not spill for sm_90 (static report, docs/kernels.md).
def _widened(table: dict[str, dict[int, list[Entry]]], factor: int, keep: int) -> dict[str, dict[int, list[Entry]]]:
    """`table` with `factor` times the warps per entry (at most 8) and no register cap, first `keep` distinct ones.

    A 16-row tile on several warps splits the head-dim columns of its accumulators over the warps, so each thread
    keeps the registers of a head-dim-32 tile on one warp.
    """
    out: dict[str, dict[int, list[Entry]]] = {}
    for kind, ranks in table.items():
        out[kind] = {}
        for rank, entries in ranks.items():
            seen: list[Entry] = []
            for tq, tk, warps, stages, *_cap in entries:
                entry = (tq, tk, min(8, warps * factor), stages)
                if entry not in seen:
                    seen.append(entry)
            out[kind][rank] = seen[:keep]
    return out


_GPU_CONFIGS: dict[int, dict[str, dict[int, list[Entry]]]] = {
    32: _CONFIGS_32,
    64: _widened(_CONFIGS_32, 2, 4),
    128: _widened(_CONFIGS_32, 4, 4),
    256: _widened(_CONFIGS_32, 8, 3),
}
# Entries (class, kernel, rank: positions) that spill in the main loop for sm_90 in the static report
# (`benchmarks/static_cost.py --search-space`, docs/kernels.md) are left out of the search space. At head dim 256 every
# 2-D and 3-D dQ entry spills (each warp keeps all 256 columns of its q and dO rows as tl.dot operands): the
# least-spilling one is kept, and the 2-D table holds one more entry tried for that class alone.
_SPILLING = {
    (32, "dq", 1): (4,), (32, "dq", 2): (2, 4), (32, "dq", 3): (0, 2, 3),
    (128, "dkdv", 1): (3,), (128, "dq", 2): (0, 2), (128, "dq", 3): (0, 2, 3),
    (256, "dq", 3): (0, 2),
}
for (_cls, _kind, _rank), _drop in _SPILLING.items():
    _table = _GPU_CONFIGS[_cls][_kind]
    _table[_rank] = [e for i, e in enumerate(_table[_rank]) if i not in _drop]
_GPU_CONFIGS[256]["dq"][2] = [((4, 4, 1), (4, 4, 1), 8, 1), ((4, 8, 1), (4, 4, 1), 8, 1)]


# Interpreter: one small config per kernel (no autotuning on CPU), smaller than the test maps so that every kernel
# walks several, partly filled tiles and sub-tiles; the forward and dK/dV configs use one-wide sub-tiles (scalar
# axis), the dQ config two-dimensional ones that satisfy the rpb-gradient product rule.
_INTERPRETER_CONFIGS: dict[str, dict[int, list[Entry]]] = {
    "fwd": {1: [((16, 1, 1), (16, 1, 1), 1, 1)], 2: [((4, 4, 1), (1, 8, 1), 1, 1)],
            3: [((2, 2, 4), (1, 2, 8), 1, 1)]},
    "dq": {1: [((16, 1, 1), (16, 1, 1), 1, 1)], 2: [((4, 4, 1), (4, 4, 1), 1, 1)],
           3: [((1, 2, 8), (2, 4, 4), 1, 1)]},
    "dkdv": {1: [((16, 1, 1), (16, 1, 1), 1, 1)], 2: [((1, 8, 1), (4, 4, 1), 1, 1)],
             3: [((1, 2, 8), (2, 2, 4), 1, 1)]},
}

# Autotuning key: everything that changes the best config (and so, through the accumulation order, the result bits).
# Each kernel is keyed on the names it takes (`autotune_key`): Triton 3.9 rejects a key naming other arguments.
AUTOTUNE_KEY = ["B", "H", "L0", "L1", "L2", "DIL0", "DIL1", "DIL2", "HEAD_DIM", "K0", "K1", "K2", "S0", "S1", "S2",
                "C0", "C1", "C2", "HAS_RPB", "COMPUTE_DQ", "COMPUTE_DRPB", "COMPUTE_DK", "COMPUTE_DV", "HAS_DLSE",
                "DETERMINISTIC", "PRECISION"]


def autotune_key(kernel) -> list[str]:
    """The names of :data:`AUTOTUNE_KEY` that are arguments of `kernel`, in the key's order."""
    names = set(arg_names(kernel))
    return [name for name in AUTOTUNE_KEY if name in names]


def autotune_mode() -> str:
    """The autotuning mode: ``off`` under deterministic algorithms, else ``$NATZOO_NA_AUTOTUNE`` (default full)."""
    if torch.are_deterministic_algorithms_enabled():
        return "off"
    mode = os.environ.get(ENV_AUTOTUNE, "").strip().lower() or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{ENV_AUTOTUNE} must be one of {', '.join(AUTOTUNE_MODES)}, got {mode!r}")
    return mode


def head_dim_class(head_dim: int) -> int:
    """The config-table class of `head_dim`: the smallest of 32, 64, 128, 256 that holds it."""
    for cls in HEAD_DIM_CLASSES:
        if head_dim <= cls:
            return cls
    raise ValueError(f"head_dim={head_dim} exceeds the largest kernel class {HEAD_DIM_CLASSES[-1]}")


def search_space(kind: str, rank: int, head_dim: int) -> list[Entry]:
    """Every GPU config `full` autotuning may choose for kernel `kind` (what ``configcheck`` checks, one by one)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return list(_GPU_CONFIGS[head_dim_class(head_dim)][kind][rank])


# Per kernel kind: the one entry forced by `force_config` in this thread (or asyncio task), if any.
_pinned: contextvars.ContextVar[tuple[tuple[str, Entry], ...]] = contextvars.ContextVar("natzoo_na_pinned",
                                                                                       default=())


@contextlib.contextmanager
def force_config(kind: str, entry: Entry) -> Iterator[None]:
    """Runs every launch of kernel `kind` (``fwd``, ``dq``, ``dkdv``) inside the block with exactly `entry`.

    Autotuning is bypassed: the kernel is wrapped in an autotuner holding only `entry`, which Triton launches without
    benchmarking or consulting any autotuning cache, on GPU and in the interpreter alike. The compiled binary is the
    one `full` autotuning launches when it picks `entry` for the same arguments. Forcing nests and is per thread.

    Args:
        kind: The kernel.
        entry: ``(query tile, key tile, warps, stages[, register cap])``, e.g. one of :func:`search_space`.
    """
    if kind not in KINDS:
        raise ValueError(f"force_config: kind must be one of {KINDS}, got {kind!r}")
    if not (isinstance(entry, tuple) and len(entry) in (4, 5) and all(len(t) == 3 for t in entry[:2])):
        raise ValueError(f"force_config: entry must be (query tile, key tile, warps, stages[, maxnreg]), got {entry!r}")
    token = _pinned.set((*_pinned.get(), (kind, tuple(entry))))
    try:
        yield
    finally:
        _pinned.reset(token)


def config_entries(kind: str, rank: int, mode: str, head_dim: int = 32) -> list[Entry]:
    """The configs kernel `kind` (``fwd``, ``dq``, ``dkdv``) may use for `rank` spatial axes in autotuning `mode`:
    the forced entry (:func:`force_config`), else the interpreter's one, else the GPU search space of the head-dim
    class cut down to the mode."""
    forced = [entry for pinned, entry in _pinned.get() if pinned == kind]
    if forced:
        return forced[-1:]  # the innermost
    if interpreting():
        return _INTERPRETER_CONFIGS[kind][rank][:1]
    table = search_space(kind, rank, head_dim)
    return table[:1] if mode == "off" else table[:2] if mode == "quick" else table


def rpb_products_ok(tq: Tile, tk: Tile, rank: int) -> bool:
    """Whether a dQ config can reduce the rpb gradient with tensor-core products (both contractions >= 16)."""
    if rank == 1:
        return True
    outer = tq[0] * tk[0] * (tq[1] * tk[1] if rank == 3 else 1)
    inner = tq[rank - 1] * tk[rank - 1]
    return outer >= 16 and inner >= 16


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    if not kwargs.get("COMPUTE_DRPB", False):
        return configs
    rank = 3 if kwargs["K2"] > 1 else 2 if kwargs["K1"] > 1 else 1
    kept = [c for c in configs if rpb_products_ok(*_tiles(c), rank)]
    return kept or configs[:1]


def _tiles(config: triton.Config) -> tuple[Tile, Tile]:
    kw = config.kwargs
    return (kw["TQ0"], kw["TQ1"], kw["TQ2"]), (kw["TK0"], kw["TK1"], kw["TK2"])


def diagonals(tq: Tile, tk: Tile, rank: int) -> int:
    """Width of the inner-diagonal block of `rpb_partial` (`rpb_partial_1d` for rank 1) for a dQ config."""
    if rank == 1:
        return triton.next_power_of_2(tq[0] + tk[0] - 1)
    return max(16, triton.next_power_of_2(tq[rank - 1] + tk[rank - 1] - 1))


def _cfg(
    kind: str, rank: int, tq: Tile, tk: Tile, warps: int, stages: int, maxnreg: int | None = None
) -> triton.Config:
    kw = {"TQ0": tq[0], "TQ1": tq[1], "TQ2": tq[2], "TK0": tk[0], "TK1": tk[1], "TK2": tk[2]}
    if kind == "dq":
        kw["FI"] = diagonals(tq, tk, rank)
    return triton.Config(kw, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


class KernelLaunchError(RuntimeError):
    """A Triton kernel failed to compile or launch; the message names kernel, configs, shape, dtype and the way out."""


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device (launches go to the inputs' GPU, not the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def launching(kernel: str, kind: str, problem, mode: str) -> Iterator[None]:
    """Device guard around a kernel launch; a failure is re-raised as :class:`KernelLaunchError` with the context."""
    with device_guard(problem.device):
        try:
            yield
        except Exception as exc:  # any compile or launch error: add the context, keep the cause
            entries = config_entries(kind, problem.n, mode, problem.head_dim)
            configs = entries[0] if len(entries) == 1 else f"autotuning over {len(entries)} configs {entries}"
            raise KernelLaunchError(
                f"{problem.name}: the Triton {kernel} kernel failed ({type(exc).__name__}: {exc}); config "
                f"{configs}; shape [B={problem.batch}, spatial={problem.spatial}, heads={problem.heads}, "
                f"head_dim={problem.head_dim}], kernel_size={problem.kernel_size}, dilation={problem.dilation}, "
                f"dtype={problem.dtype}, device={problem.device}. Choose another backend with backend='dense' or "
                "backend='reference' (or use_backend(...) / NATZOO_NA_BACKEND=dense), or another config with "
                f"{ENV_AUTOTUNE}=off"
            ) from exc


def tuned(kernel, kind: str, rank: int, mode: str, head_dim: int, reset: tuple[str, ...] = ()):
    """`kernel` wrapped in a ``triton.autotune`` over :func:`config_entries`; one wrapper per distinct config list.

    Checks the torch and Triton versions first (:func:`.compat.check_versions` warns once outside the tested range);
    in the interpreter, lets Triton 3.6 take the kernels' runtime loop bounds
    (:func:`.compat.patch_interpreter_scalars`).
    """
    check_versions()
    if interpreting():
        patch_interpreter_scalars()
    return _autotuned(kernel, kind, rank, tuple(config_entries(kind, rank, mode, head_dim)), reset)


@functools.cache
def _autotuned(kernel, kind: str, rank: int, entries: tuple[Entry, ...], reset: tuple[str, ...]):
    return triton.autotune(configs=[_cfg(kind, rank, *e) for e in entries], key=autotune_key(kernel),
                           reset_to_zero=list(reset) or None,
                           prune_configs_by={"early_config_prune": _prune})(kernel)


@triton.jit
def window(i, group_len, K: tl.constexpr, S: tl.constexpr, CAUSAL: tl.constexpr):
    """In-group key range ``[start, end)`` of in-group query `i` (docs/ops.md); `i` may be a scalar or a block."""
    if CAUSAL:
        leader = tl.minimum((i // S) * S + S - 1, group_len - 1)
        start = tl.maximum(leader - K + 1, 0)
        end = i + 1
    else:
        leader = tl.minimum((i // S) * S + S // 2, group_len - 1)
        start = tl.minimum(tl.maximum(leader - K // 2, 0), group_len - K)
        end = start + K
    return start, end


@triton.jit
def inverse_window(j, group_len, K: tl.constexpr, S: tl.constexpr, CAUSAL: tl.constexpr):
    """In-group query range ``[qs, qe)`` attending to in-group key `j` (same formulas as ``indexing.inverse_window``).

    Triton's integer division truncates towards zero; the branches that could see a negative numerator are the
    ones ``tl.where`` discards, so the kept values always use floor division of non-negative numbers.
    """
    if CAUSAL:
        qs = j
        qe = tl.minimum(S * ((j + K) // S + tl.where(j + K >= group_len, 1, 0)), group_len)
    else:
        LEFT: tl.constexpr = K // 2
        RIGHT: tl.constexpr = K - 1 - LEFT
        OFF: tl.constexpr = S - S // 2 - 1
        qs = tl.where(j < K, 0, ((j - RIGHT + OFF) // S) * S)
        qe = tl.where(j >= group_len - K, group_len, ((j + LEFT + OFF + 1) // S) * S)
    return qs, qe


@triton.jit
def split3(flat, N1, N2):
    """Row-major decomposition of `flat` over a box ``(_, N1, N2)``."""
    return flat // (N1 * N2), (flat // N2) % N1, flat % N2


@triton.jit
def program_batch(T0, T1, T2, L0, L1, L2, DIL0, DIL1, DIL2):
    """Splits program id 0 into (tile index, batch): the grid is ``(tiles * batch, heads, 1)``, batch folded into
    axis 0 (up to 2**31 - 1 programs) so that no batch size meets the 65535 limit of grid axes 1 and 2."""
    tiles = (DIL0 * DIL1 * DIL2 * tl.cdiv(tl.cdiv(L0, DIL0), T0) * tl.cdiv(tl.cdiv(L1, DIL1), T1)
             * tl.cdiv(tl.cdiv(L2, DIL2), T2))
    pid = tl.program_id(0)
    return pid % tiles, (pid // tiles).to(tl.int64)


@triton.jit
def tile_origin(pid, L0, L1, L2, DIL0, DIL1, DIL2, T0, T1, T2):
    """Decodes program id 0 into (dilation group, group lengths, first in-group index of the tile) per axis.

    Groups vary fastest; tiles per axis are counted over the longest group, so a shorter group may get a tile that
    lies wholly past its end (its rows are masked out).
    """
    groups = DIL0 * DIL1 * DIL2
    g0, g1, g2 = split3(pid % groups, DIL1, DIL2)
    lg0 = (L0 - g0 + DIL0 - 1) // DIL0
    lg1 = (L1 - g1 + DIL1 - 1) // DIL1
    lg2 = (L2 - g2 + DIL2 - 1) // DIL2
    t0, t1, t2 = split3(pid // groups, tl.cdiv(tl.cdiv(L1, DIL1), T1), tl.cdiv(tl.cdiv(L2, DIL2), T2))
    return g0, g1, g2, lg0, lg1, lg2, t0 * T0, t1 * T1, t2 * T2


@triton.jit
def box_coords(idx, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Row-major coordinates of the flat indices `idx` inside a box ``(T0, T1, T2)`` (0 on one-wide axes)."""
    return (idx // (T1 * T2)) % T0, (idx // T2) % T1, idx % T2


@triton.jit
def advance(u0, u1, u2, n1, n2):
    """The next sub-tile counter of a row-major walk over ``(_, n1, n2)`` sub-tiles (no division in the loop)."""
    u2 += 1
    wrap = u2 >= n2
    u2 = tl.where(wrap, 0, u2)
    u1 = tl.where(wrap, u1 + 1, u1)
    wrap = u1 >= n1
    u1 = tl.where(wrap, 0, u1)
    u0 = tl.where(wrap, u0 + 1, u0)
    return u0, u1, u2


@triton.jit
def axis_offsets(c0, c1, c2, DIL0, DIL1, DIL2, s0, s1, s2, WIDE: tl.constexpr):
    """Element offsets ``sum_a c_a * DIL_a * s_a`` of in-tile coordinates; int64 when `WIDE` (tensors >= 2**31)."""
    if WIDE:
        out = (c0 * DIL0).to(tl.int64) * s0 + (c1 * DIL1).to(tl.int64) * s1 + (c2 * DIL2).to(tl.int64) * s2
    else:
        out = c0 * DIL0 * s0 + c1 * DIL1 * s1 + c2 * DIL2 * s2
    return out


@triton.jit
def inwin(j, qs, w):
    """``qs <= j < qs + w`` as one unsigned comparison (``w == 0`` makes it false)."""
    return (j - qs).to(tl.uint32) < w.to(tl.uint32)


@triton.jit
def dot_operand(x, UPCAST: tl.constexpr):
    """`x` as a ``tl.dot`` operand: float32 when `UPCAST` (the interpreter's bfloat16 dot is wrong, see kernels.md)."""
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def finite_rows(x):
    """Per row of a 2-D float32 block: True when every element is finite (a row sum that stays finite)."""
    total = tl.sum(x, 1)
    return tl.abs(total) < float("inf")


@triton.jit
def rpb_partial(ds, off0, off1, off2,
                TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
                TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
                RANK: tl.constexpr, R0P: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr, FI: tl.constexpr,
                PRECISION: tl.constexpr):
    """Sums ``ds [BQ, BK]`` of one (query tile, key sub-tile) pair into rpb bins, for 2-D and 3-D problems.

    Pair (query row q, key column c) has bin ``r_a = off_a + c_a - q_a`` on every axis, ``off_a`` being
    ``K_a - 1 +`` (sub-tile origin - tile origin). The last axis is reduced first: ``ds`` is rearranged so that its
    rows are (outer query, outer key) pairs and its columns (inner query, inner key) pairs, and a product with a
    one-hot ``[inner pairs, inner diagonal]`` matrix sums every inner diagonal. Two more one-hot products place
    the outer pairs and shift the inner diagonals onto their bins. Pairs outside the window have ``ds == 0``.

    Returns:
        ``[RO, RI]`` float32 partial sums, rows the outer bins (``R0P`` or ``R0P * R1P``), columns the last axis.
        ``FI`` (>= 16, a power of two) is the number of inner diagonals, see `diagonals`.
    """
    if RANK == 3:
        TQO: tl.constexpr = TQ0 * TQ1
        TKO: tl.constexpr = TK0 * TK1
        TQI: tl.constexpr = TQ2
        TKI: tl.constexpr = TK2
        RO: tl.constexpr = R0P * R1P
        RI: tl.constexpr = R2P
    else:
        # Triton needs the constexpr annotation in each branch
        TQO: tl.constexpr = TQ0  # type: ignore[no-redef]
        # Triton needs the constexpr annotation in each branch
        TKO: tl.constexpr = TK0  # type: ignore[no-redef]
        # Triton needs the constexpr annotation in each branch
        TQI: tl.constexpr = TQ1  # type: ignore[no-redef]
        # Triton needs the constexpr annotation in each branch
        TKI: tl.constexpr = TK1  # type: ignore[no-redef]
        # Triton needs the constexpr annotation in each branch
        RO: tl.constexpr = R0P  # type: ignore[no-redef]
        # Triton needs the constexpr annotation in each branch
        RI: tl.constexpr = R1P  # type: ignore[no-redef]
    # [(qo, qi), (ko, ki)] -> [(qo, ko), (qi, ki)]
    a = tl.reshape(tl.permute(tl.reshape(ds, (TQO, TQI, TKO, TKI)), (0, 2, 1, 3)), (TQO * TKO, TQI * TKI))
    # Inner diagonals: f = ki - qi + TQI - 1.
    pi = tl.arange(0, TQI * TKI)
    f = tl.arange(0, FI)
    diag = tl.where((pi % TKI - pi // TKI + TQI - 1)[:, None] == f[None, :], 1.0, 0.0)
    inner = tl.dot(a, diag, input_precision=PRECISION)  # [TQO * TKO, FI]
    # Outer placement: row r_o of the result collects the pairs (qo, ko) with r_a = off_a + k_a - q_a on outer axes.
    po = tl.arange(0, TQO * TKO)
    qo, ko = po // TKO, po % TKO
    ro = tl.arange(0, RO)
    if RANK == 3:
        hit = ((ro // R1P)[:, None] == (off0 + ko // TK1 - qo // TQ1)[None, :]) & \
              ((ro % R1P)[:, None] == (off1 + ko % TK1 - qo % TQ1)[None, :])
    else:
        hit = ro[:, None] == (off0 + ko - qo)[None, :]
    outer = tl.dot(tl.where(hit, 1.0, 0.0), inner, input_precision=PRECISION)  # [RO, FI]
    # Inner shift: diagonal f lands on bin off_inner + f - (TQI - 1).
    if RANK == 3:
        off_i = off2
    else:
        off_i = off1
    ri = tl.arange(0, RI)
    shift = tl.where((off_i + f - (TQI - 1))[:, None] == ri[None, :], 1.0, 0.0)
    return tl.dot(outer, shift, input_precision=PRECISION)


@triton.jit
def rpb_partial_1d(ds, off, BQ: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, TP: tl.constexpr):
    """1-D variant of `rpb_partial`: ``[RP]`` sums of ``ds [BQ, BK]`` over bins ``off + c - q``.

    Each diagonal ``t = c - q + BQ - 1`` (``TP`` of them, a power of two) is gathered into one column
    (``tl.gather``) and summed over rows; the diagonals are then gathered onto their bins.
    """
    q = tl.arange(0, BQ)
    t = tl.arange(0, TP)
    col = t[None, :] + q[:, None] - (BQ - 1)  # [BQ, TP]
    valid = (col >= 0) & (col < BK)
    skew = tl.where(valid, tl.gather(ds, tl.minimum(tl.maximum(col, 0), BK - 1), 1), 0.0)
    diag = tl.sum(skew, 0)  # [TP]
    r = tl.arange(0, RP)
    src = r - off + BQ - 1
    ok = (src >= 0) & (src < TP)
    return tl.where(ok, tl.gather(diag, tl.minimum(tl.maximum(src, 0), TP - 1), 0), 0.0)
