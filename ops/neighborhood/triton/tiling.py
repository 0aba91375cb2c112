"""Tile configurations and the in-kernel window arithmetic shared by the forward and backward kernels.

Every kernel works on three spatial axes. A 1-D or 2-D problem is padded to three axes with dummy axes of length 1,
kernel 1, stride 1, dilation 1 and no causal mask (so window ``[0, 1)`` and rpb extent 1); their strides are 0.

Query tiles are boxes ``(T0, T1, T2)`` of in-group indices of one dilation group, flattened row-major into
``T0 * T1 * T2`` rows of a Triton block. Each tile size is a power of two. On the GPU the block row counts are at
least 16, because ``tl.dot`` needs it.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

Tile = tuple[int, int, int]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cfg(tq: Tile, tk: Tile, warps: int, stages: int) -> triton.Config:
    kw = {"TQ0": tq[0], "TQ1": tq[1], "TQ2": tq[2], "TK0": tk[0], "TK1": tk[1], "TK2": tk[2]}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# GPU search spaces per rank: (query tile, key tile, warps, stages). Small NAT windows (k=7) favour small query
# tiles (spec 5.2: tile efficiency), large head dims favour fewer rows per block.
_GPU_CONFIGS: dict[int, list[tuple[Tile, Tile, int, int]]] = {
    1: [((64, 1, 1), (64, 1, 1), 4, 2), ((128, 1, 1), (64, 1, 1), 8, 2), ((64, 1, 1), (32, 1, 1), 4, 3),
        ((32, 1, 1), (32, 1, 1), 4, 2)],
    2: [((8, 8, 1), (8, 8, 1), 4, 2), ((8, 8, 1), (4, 8, 1), 4, 2), ((4, 8, 1), (8, 8, 1), 4, 2),
        ((16, 8, 1), (8, 8, 1), 8, 2), ((4, 4, 1), (4, 8, 1), 4, 2)],
    3: [((4, 4, 4), (4, 4, 4), 4, 2), ((2, 4, 8), (2, 4, 8), 4, 2), ((2, 8, 8), (2, 4, 8), 8, 2),
        ((2, 4, 4), (2, 4, 4), 4, 2)],
}

# Interpreter: one small config (no autotuning on CPU); tiles smaller than the test maps so that every kernel walks
# several query and key tiles, partial tiles included.
_INTERPRETER_CONFIGS: dict[int, list[tuple[Tile, Tile, int, int]]] = {
    1: [((16, 1, 1), (16, 1, 1), 1, 1)],
    2: [((4, 8, 1), (4, 8, 1), 1, 1)],
    3: [((2, 4, 4), (2, 4, 4), 1, 1)],
}


def configs(rank: int) -> list[triton.Config]:
    """The autotuning search space for a problem of `rank` spatial axes."""
    table = _INTERPRETER_CONFIGS if interpreting() else _GPU_CONFIGS
    return [_cfg(*entry) for entry in table[rank]]


# Autotuning keys: everything that changes the best tile (map shape, dilation, head dim, window).
AUTOTUNE_KEY = ["L0", "L1", "L2", "DIL0", "DIL1", "DIL2", "BLOCK_D", "K0", "K1", "K2", "S0", "S1", "S2"]

# Flat query block of the d_rpb kernel (not autotuned: its atomic adds must run exactly once).
DRPB_BLOCK_Q = 64 if interpreting() else 32


@triton.jit
def window(i, group_len, K: tl.constexpr, S: tl.constexpr, CAUSAL: tl.constexpr):
    """In-group key range ``[start, end)`` of in-group query `i` (spec 2.2); `i` may be a scalar or a block."""
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
    """In-group query range ``[qs, qe)`` attending to in-group key `j` (spec 2.6).

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
def row_offsets(b, h, x0, x1, x2, sb, s0, s1, s2, sh):
    """int64 element offsets of tokens ``(b, x0, x1, x2, h)`` in a strided ``[B, L0, L1, L2, H, *]`` tensor.

    `b` and `h` are int64 scalars; the coordinates are int32 blocks, widened before multiplying by the strides so
    that tensors over 2**31 elements address correctly.
    """
    return b * sb + h * sh + x0.to(tl.int64) * s0 + x1.to(tl.int64) * s1 + x2.to(tl.int64) * s2


@triton.jit
def bias_block(RPB, h, i0, i1, i2, j0, j1, j2, mask, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):
    """rpb[h, r0, r1, r2] for every (query row, key column) pair, in float32, 0 where `mask` is false.

    `i*` are ``[BQ, 1]`` and `j*` ``[1, BK]`` in-group indices (or the transposed arrangement); rpb is a
    contiguous ``[H, 2K0-1, 2K1-1, 2K2-1]`` table and ``r_a = (K_a - 1) + j_a - i_a`` (spec 3.2).
    """
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    RH: tl.constexpr = (2 * K0 - 1) * R1 * R2
    idx = ((K0 - 1 + j0 - i0) * R1 + (K1 - 1 + j1 - i1)) * R2 + (K2 - 1 + j2 - i2)
    return tl.load(RPB + h * RH + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def dot_operand(x, UPCAST: tl.constexpr):
    """`x` as a ``tl.dot`` operand: float32 when `UPCAST` (the interpreter's bfloat16 dot is wrong, see kernels.md)."""
    if UPCAST:
        x = x.to(tl.float32)
    return x
