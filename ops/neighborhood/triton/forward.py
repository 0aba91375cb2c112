"""Fused neighborhood-attention forward kernel (online softmax over the neighbourhood, FlashAttention style).

Supports: 1-D/2-D/3-D (padded to three axes), per-axis kernel size (odd and even), stride, dilation (lengths not
divisible by it) and causal flag; optional rpb (any float dtype, added in float32); custom scale (negative and zero
included); float32 (IEEE or TF32 products), float16 and bfloat16 inputs with float32 accumulation; head dims up to
256 (the block is the next power of two >= 16, loads masked on the head dim); arbitrary input strides (no copies).

Design: one program per (multi-dimensional query tile of one dilation group, head, batch). The tile's key region is
the halo box ``[start(i_first), end(i_last))`` per axis (window starts and ends are non-decreasing in the query
index), walked in key sub-tiles; an exact per-pair mask (each query's own window on every axis) selects the
neighbourhood. Each axis test is one unsigned comparison, and an axis on which the sub-tile is one key wide is tested
once per row per loop trip instead of once per score slot. The rpb index of a pair is a row term plus a column term
(one add per slot). Dilation is strided indexing: a tile holds in-group indices, global coordinates are ``g + d * i``.
Writes ``out`` and the natural-log ``lse``; the ``N x prod(k)`` attention matrix never reaches global memory.

Non-finite inputs: a NaN or inf in one key or value makes non-finite exactly the outputs of the queries whose window
contains that key. Keys outside a query's window only meet it through ``p @ v`` with ``p == 0``, where a non-finite
value would still poison the row (``0 * inf``); so a program whose tile ends with a non-finite output row runs its
loop once more with the values sanitised and the bad keys' scores set to NaN. Finite inputs never take that path:
its cost is one row check per program.

Tested: under the Triton interpreter on CPU (tests/test_triton.py) against the dense float64 oracle. GPU numerics and
performance are verified only where a GPU run recorded them (docs/kernels.md, docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..validation import Problem
from .tiling import (
    LN2,
    LOG2E,
    advance,
    autotune_mode,
    axis_offsets,
    box_coords,
    dot_operand,
    finite_rows,
    interpreting,
    inwin,
    launching,
    program_batch,
    tile_origin,
    tuned,
    window,
)


@dataclass(frozen=True)
class Geometry:
    """A problem padded to three spatial axes, as the kernels see it."""

    # Three entries each (built from a problem of any rank by padding with 1 / False).
    spatial: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]

    @classmethod
    def of(cls, problem: Problem) -> Geometry:
        pad = 3 - problem.n
        return cls(
            spatial=tuple(problem.spatial) + (1,) * pad,
            kernel_size=tuple(problem.kernel_size) + (1,) * pad,
            stride=tuple(problem.stride) + (1,) * pad,
            dilation=tuple(problem.dilation) + (1,) * pad,
            is_causal=tuple(problem.is_causal) + (False,) * pad,
        )

    def constexprs(self) -> dict:
        k, s, c = self.kernel_size, self.stride, self.is_causal
        names = ("K", "S", "C")
        return {f"{name}{axis}": values[axis] for name, values in zip(names, (k, s, c)) for axis in range(3)}

    def sizes(self) -> dict:
        (l0, l1, l2), (d0, d1, d2) = self.spatial, self.dilation
        return {"L0": l0, "L1": l1, "L2": l2, "DIL0": d0, "DIL1": d1, "DIL2": d2}

    def num_tiles(self, tile: tuple[int, int, int]) -> int:
        """Tiles of shape `tile` per dilation group (sized for the longest group), times the number of groups."""
        count = 1
        for length, d, t in zip(self.spatial, self.dilation, tile):
            count *= triton.cdiv(triton.cdiv(length, d), t) * d
        return count


def strides6(t: torch.Tensor, n: int) -> tuple[int, ...]:
    """Strides ``(batch, axis0, axis1, axis2, head, dim)`` of a ``[B, *S(n), H, D]`` tensor; dummy axes get 0."""
    st = t.stride()
    return (st[0], *st[1 : 1 + n], *(0,) * (3 - n), st[-2], st[-1])


def head_block(head_dim: int) -> int:
    """The head-dim block: a power of two, at least 16 (``tl.dot`` minimum), masked down to `head_dim` on loads."""
    return max(16, triton.next_power_of_2(head_dim))


def tf32_allowed() -> bool:
    """Whether PyTorch allows TF32 for float32 CUDA matmuls, under either of its precision APIs.

    The new API (``torch.backends.cuda.matmul.fp32_precision``, else ``torch.backends.fp32_precision``) wins where set;
    ``torch.get_float32_matmul_precision()`` raises RuntimeError once a program has mixed the two (torch 2.9+), so it
    is read only when neither is set.
    """
    for setting in (getattr(torch.backends.cuda.matmul, "fp32_precision", "none"),
                    getattr(torch.backends, "fp32_precision", "none")):
        if setting in ("tf32", "ieee"):
            return setting == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE products for float32 unless PyTorch allows TF32 for matmuls; 16-bit inputs ignore the setting."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def launch_grid(geo: Geometry, tile: tuple[int, int, int], batch: int, heads: int) -> tuple[int, int, int]:
    """``(tiles * batch, heads, 1)``: batch is folded into grid axis 0 (limit 2**31 - 1), heads stay on axis 1
    (limit 65535, checked by the capability predicate); the kernels split axis 0 with `program_batch`."""
    return (geo.num_tiles(tile) * batch, heads, 1)


def upcast_operands(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bfloat16 ``tl.dot`` operands wrongly; give it float32 operands."""
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def pair_mask(rowok, o0, o1, o2, c0, c1, c2, qs0, qs1, qs2, w0, w1, w2,
              K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
              TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr):
    """``[BQ, BK]`` window mask of query rows against the key columns ``o_a + c_a`` of one sub-tile.

    `rowok` ``[BQ]`` holds the row condition and `qs_a`/`w_a` ``[BQ]`` the window start and width per axis; `o_a`
    is the sub-tile origin and `c_a` ``[BK]`` the in-sub-tile coordinate. An axis on which the sub-tile is one wide
    is tested once per row and folded into the row condition; the row condition rides on the first other axis as a
    zero width, so every slot costs one subtraction and one unsigned comparison per remaining axis.
    """
    if TK0 == 1 and K0 > 1:
        rowok = rowok & inwin(o0, qs0, w0)
    if TK1 == 1 and K1 > 1:
        rowok = rowok & inwin(o1, qs1, w1)
    if TK2 == 1 and K2 > 1:
        rowok = rowok & inwin(o2, qs2, w2)
    if TK0 > 1:
        pair = inwin(c0[None, :], (qs0 - o0)[:, None], tl.where(rowok, w0, 0)[:, None])
        if TK1 > 1:
            pair = pair & inwin(c1[None, :], (qs1 - o1)[:, None], w1[:, None])
        if TK2 > 1:
            pair = pair & inwin(c2[None, :], (qs2 - o2)[:, None], w2[:, None])
    elif TK1 > 1:
        pair = inwin(c1[None, :], (qs1 - o1)[:, None], tl.where(rowok, w1, 0)[:, None])
        if TK2 > 1:
            pair = pair & inwin(c2[None, :], (qs2 - o2)[:, None], w2[:, None])
    else:
        pair = inwin(c2[None, :], (qs2 - o2)[:, None], tl.where(rowok, w2, 0)[:, None])
    return pair


@triton.jit
def query_tile(pid, L0, L1, L2, DIL0, DIL1, DIL2,
               K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
               S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
               C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
               TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
               TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr):
    """The query tile of program `pid` and the halo box its loop walks (forward and dQ kernels).

    Returns the dilation group and tile origin per axis, the in-tile row coordinates and in-group query indices
    (``[BQ]`` per axis), the row validity, the per-axis window start (relative to the halo box start) and width of
    every row (``[BQ]``), the halo box start and end per axis, the sub-tile counts of axes 1 and 2 and the number of
    loop trips (0 for a tile past the end of a short group).
    """
    BQ: tl.constexpr = TQ0 * TQ1 * TQ2
    g0, g1, g2, lg0, lg1, lg2, first0, first1, first2 = tile_origin(pid, L0, L1, L2, DIL0, DIL1, DIL2,
                                                                    TQ0, TQ1, TQ2)
    r0, r1, r2 = box_coords(tl.arange(0, BQ), TQ0, TQ1, TQ2)
    i0, i1, i2 = first0 + r0, first1 + r1, first2 + r2  # [BQ] in-group query indices
    q_ok = (i0 < lg0) & (i1 < lg1) & (i2 < lg2)
    qs0, qe0 = window(i0, lg0, K0, S0, C0)
    qs1, qe1 = window(i1, lg1, K1, S1, C1)
    qs2, qe2 = window(i2, lg2, K2, S2, C2)
    box0, _ = window(first0, lg0, K0, S0, C0)
    box1, _ = window(first1, lg1, K1, S1, C1)
    box2, _ = window(first2, lg2, K2, S2, C2)
    _, end0 = window(tl.minimum(first0 + TQ0 - 1, lg0 - 1), lg0, K0, S0, C0)
    _, end1 = window(tl.minimum(first1 + TQ1 - 1, lg1 - 1), lg1, K1, S1, C1)
    _, end2 = window(tl.minimum(first2 + TQ2 - 1, lg2 - 1), lg2, K2, S2, C2)
    tile_ok = (first0 < lg0) & (first1 < lg1) & (first2 < lg2)
    nk0 = tl.where(tile_ok, tl.cdiv(end0 - box0, TK0), 0)
    nk1 = tl.cdiv(end1 - box1, TK1)
    nk2 = tl.cdiv(end2 - box2, TK2)
    # Window starts relative to the halo box start, as the loops compare them with in-box key coordinates.
    return (g0, g1, g2, first0, first1, first2, r0, r1, r2, i0, i1, i2, q_ok, qs0 - box0, qs1 - box1, qs2 - box2,
            qe0 - qs0, qe1 - qs1, qe2 - qs2, box0, box1, box2, end0, end1, end2, nk1, nk2, nk0 * nk1 * nk2)


@triton.jit
def tile_base(g0, g1, g2, t0, t1, t2, b, h, sb, s0, s1, s2, sh, DIL0, DIL1, DIL2):
    """int64 offset of in-group position ``(t0, t1, t2)`` of dilation group ``(g0, g1, g2)`` for batch `b`, head `h`."""
    return (b * sb + h * sh + (g0 + DIL0 * t0).to(tl.int64) * s0 + (g1 + DIL1 * t1).to(tl.int64) * s1
            + (g2 + DIL2 * t2).to(tl.int64) * s2)


@triton.jit
def tile_ptrs(X, g0, g1, g2, t0, t1, t2, r0, r1, r2, b, h, sb, s0, s1, s2, sh, sd, dims, DIL0, DIL1, DIL2,
              WIDE: tl.constexpr):
    """``[BT, BLOCK_D]`` pointers to the rows ``t + r`` (in-group) of dilation group `g` of a strided
    ``[B, L0, L1, L2, H, D]`` tensor `X`, for batch `b` and head `h`."""
    return (X + tile_base(g0, g1, g2, t0, t1, t2, b, h, sb, s0, s1, s2, sh, DIL0, DIL1, DIL2)
            + axis_offsets(r0, r1, r2, DIL0, DIL1, DIL2, s0, s1, s2, WIDE)[:, None] + dims[None, :] * sd)


@triton.jit
def sub_tile_offsets(dims, s0, s1, s2, sd, DIL0, DIL1, DIL2, WIDE: tl.constexpr,
                     T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Loop invariants of a sub-tile walk: in-sub-tile coordinates per axis and ``[BT, BLOCK_D]`` element offsets."""
    c0, c1, c2 = box_coords(tl.arange(0, T0 * T1 * T2), T0, T1, T2)
    return c0, c1, c2, axis_offsets(c0, c1, c2, DIL0, DIL1, DIL2, s0, s1, s2, WIDE)[:, None] + dims[None, :] * sd


@triton.jit
def key_sub_tile_scores(q, k_base, v_base, rpb_base, koff, voff, u0, u1, u2, c0, c1, c2, bcol, brow,
                        box0, box1, box2, end0, end1, end2, q_ok, qs0, qs1, qs2, w0, w1, w2, d_ok,
                        sk0, sk1, sk2, sv0, sv1, sv2, DIL0, DIL1, DIL2, scale,
                        K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, HAS_RPB: tl.constexpr,
                        EVEN_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr,
                        TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr):
    """Key sub-tile ``(u0, u1, u2)`` of the halo walk: K and V, the window mask and the logits ``[BQ, BK]``.

    Logits are ``scale * q.k`` plus the rpb in natural units; with rpb, masked slots get the value `MASKED` from the
    bias load. Also returns the sub-tile origin relative to the box start.
    """
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    o0, o1, o2 = u0 * TK0, u1 * TK1, u2 * TK2
    k_ok = (c0 < end0 - box0 - o0) & (c1 < end1 - box1 - o1) & (c2 < end2 - box2 - o2)
    kv_mask = k_ok[:, None] if EVEN_D else k_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + tile_step(o0, o1, o2, DIL0, DIL1, DIL2, sk0, sk1, sk2) + koff, mask=kv_mask, other=0.0)
    v = tl.load(v_base + tile_step(o0, o1, o2, DIL0, DIL1, DIL2, sv0, sv1, sv2) + voff, mask=kv_mask, other=0.0)
    k = dot_operand(k, UPCAST)
    v = dot_operand(v, UPCAST)
    pair = pair_mask(q_ok, o0, o1, o2, c0, c1, c2, qs0, qs1, qs2, w0, w1, w2, K0, K1, K2, TK0, TK1, TK2)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if HAS_RPB:
        bias_ptr = rpb_base + ((o0 * R1 + o1) * R2 + o2) + (brow[:, None] + bcol[None, :])
        s += tl.load(bias_ptr, mask=pair, other=MASKED).to(tl.float32)
    return k, v, pair, s, o0, o1, o2


@triton.jit
def _fwd_loop(acc, m_i, l_i, poisoned, q, k_base, v_base, rpb_base, n_trips, nk1, nk2, box0, box1, box2, end0, end1,
              end2, q_ok, qs0, qs1, qs2, w0, w1, w2, brow, dims, d_ok, sk0, sk1, sk2, skd, sv0, sv1, sv2, svd,
              DIL0, DIL1, DIL2, scale,
              K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
              HAS_RPB: tl.constexpr, EVEN_D: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr, GUARD: tl.constexpr,
              TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr):
    """Online softmax over the halo box in key sub-tiles; `qs_a` are window starts relative to the box start.

    `GUARD` is the rerun of a tile with a non-finite row: masked slots then select instead of adding -inf, values are
    sanitised, and `poisoned` marks the rows whose window holds a non-finite value (their output becomes NaN; their
    lse does not depend on values).
    """
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    # Loop invariants: in-sub-tile key coordinates, their K/V offsets and rpb column term.
    c0, c1, c2, koff = sub_tile_offsets(dims, sk0, sk1, sk2, skd, DIL0, DIL1, DIL2, WIDE, TK0, TK1, TK2)
    _c0, _c1, _c2, voff = sub_tile_offsets(dims, sv0, sv1, sv2, svd, DIL0, DIL1, DIL2, WIDE, TK0, TK1, TK2)
    bcol = (c0 * R1 + c1) * R2 + c2
    u0 = tl.full([], 0, tl.int32)
    u1 = tl.full([], 0, tl.int32)
    u2 = tl.full([], 0, tl.int32)
    for _ in range(n_trips):
        # Masked slots load a -inf bias: the bias load doubles as the window mask (not in the rerun, where a NaN
        # logit must not survive a masked slot).
        _k, v, pair, s, _o0, _o1, _o2 = key_sub_tile_scores(
            q, k_base, v_base, rpb_base, koff, voff, u0, u1, u2, c0, c1, c2, bcol, brow, box0, box1, box2,
            end0, end1, end2, q_ok, qs0, qs1, qs2, w0, w1, w2, d_ok, sk0, sk1, sk2, sv0, sv1, sv2, DIL0, DIL1, DIL2,
            # Triton: a tl.constexpr parameter or constant takes a plain Python value
            scale, K0, K1, K2, HAS_RPB, EVEN_D, PRECISION, UPCAST, 0.0 if GUARD else float("-inf"), TK0, TK1, TK2)  # type: ignore[arg-type]
        if GUARD:
            v_fin = tl.abs(v.to(tl.float32)) < float("inf")
            bad = tl.sum(tl.where(v_fin, 0, 1), 1) > 0
            v = tl.where(v_fin, v, 0.0).to(v.dtype)
            poisoned = tl.maximum(poisoned, tl.max(tl.where(pair & bad[None, :], 1, 0), 1))
        if GUARD or not HAS_RPB:
            s = tl.where(pair, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no key in this sub-tile (and none before) keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new) * LOG2E
        # Triton's language builtins carry no return types
        p = tl.exp2(s * LOG2E - m_safe[:, None])  # type: ignore[var-annotated]
        alpha = tl.exp2(m_i * LOG2E - m_safe)  # type: ignore[var-annotated]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        u0, u1, u2 = advance(u0, u1, u2, nk1, nk2)
    return acc, m_i, l_i, poisoned


@triton.jit
def tile_step(o0, o1, o2, DIL0, DIL1, DIL2, s0, s1, s2):
    """int64 offset of a sub-tile origin ``(o0, o1, o2)`` (in-group steps) from the box start."""
    return (o0 * DIL0).to(tl.int64) * s0 + (o1 * DIL1).to(tl.int64) * s1 + (o2 * DIL2).to(tl.int64) * s2


@triton.jit
def _na_fwd_kernel(
    Q, K, V, RPB, O, LSE,  # q/k/v/o: [B, L0, L1, L2, H, D] (strided); rpb: [H, R0, R1, R2]; lse: [B, L0, L1, L2, H]
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sob, so0, so1, so2, soh, sod,
    B, L0, L1, L2, DIL0, DIL1, DIL2, H, HEAD_DIM, scale,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    HAS_RPB: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, WIDE: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
):
    BQ: tl.constexpr = TQ0 * TQ1 * TQ2
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    RH: tl.constexpr = (2 * K0 - 1) * R1 * R2
    pid, b = program_batch(TQ0, TQ1, TQ2, L0, L1, L2, DIL0, DIL1, DIL2)
    h = tl.program_id(1).to(tl.int64)
    (g0, g1, g2, first0, first1, first2, r0, r1, r2, i0, i1, i2, q_ok, qs0, qs1, qs2, w0, w1, w2,
     box0, box1, box2, end0, end1, end2, nk1, nk2, n_trips) = query_tile(
        pid, L0, L1, L2, DIL0, DIL1, DIL2, K0, K1, K2, S0, S1, S2, C0, C1, C2,
        TQ0, TQ1, TQ2, TK0, TK1, TK2)

    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    row_mask = q_ok[:, None] if EVEN_D else q_ok[:, None] & d_ok[None, :]
    q = tl.load(tile_ptrs(Q, g0, g1, g2, first0, first1, first2, r0, r1, r2, b, h, sqb, sq0, sq1, sq2, sqh, sqd,
                          dims, DIL0, DIL1, DIL2, WIDE), mask=row_mask, other=0.0)
    q = dot_operand(q, UPCAST)
    k_base = K + tile_base(g0, g1, g2, box0, box1, box2, b, h, skb, sk0, sk1, sk2, skh, DIL0, DIL1, DIL2)
    v_base = V + tile_base(g0, g1, g2, box0, box1, box2, b, h, svb, sv0, sv1, sv2, svh, DIL0, DIL1, DIL2)
    # rpb index of (query i, key j) = row term(i) + column term(j), flat over [H, R0, R1, R2].
    rpb_base = RPB + h * RH + (box0 * R1 + box1) * R2 + box2
    brow = ((K0 - 1 - i0) * R1 + (K1 - 1 - i1)) * R2 + (K2 - 1 - i2)

    acc = tl.zeros([BQ, BLOCK_D], tl.float32)
    m_i = tl.full([BQ], float("-inf"), tl.float32)  # running max of the (natural) logits
    l_i = tl.zeros([BQ], tl.float32)  # running sum of exp
    poisoned = tl.zeros([BQ], tl.int32)
    acc, m_i, l_i, poisoned = _fwd_loop(acc, m_i, l_i, poisoned, q, k_base, v_base, rpb_base, n_trips, nk1, nk2,
                                        box0, box1, box2, end0, end1, end2, q_ok, qs0, qs1, qs2, w0, w1, w2, brow,
                                        dims, d_ok, sk0, sk1, sk2, skd, sv0, sv1, sv2, svd, DIL0, DIL1, DIL2, scale,
                                        # Triton: a tl.constexpr parameter or constant takes a plain Python value
                                        K0, K1, K2, HAS_RPB, EVEN_D, WIDE, PRECISION, UPCAST, False, TK0, TK1, TK2)  # type: ignore[arg-type]
    if tl.max(tl.where(q_ok & ~finite_rows(acc), 1, 0)) > 0:
        # A non-finite row: recompute the tile with non-finite values confined to their own queries.
        acc, m_i, l_i, poisoned = _fwd_loop(tl.zeros([BQ, BLOCK_D], tl.float32),
                                            tl.full([BQ], float("-inf"), tl.float32), tl.zeros([BQ], tl.float32),
                                            poisoned, q, k_base, v_base, rpb_base, n_trips, nk1, nk2,
                                            box0, box1, box2, end0, end1, end2, q_ok, qs0, qs1, qs2, w0, w1, w2, brow,
                                            dims, d_ok, sk0, sk1, sk2, skd, sv0, sv1, sv2, svd, DIL0, DIL1, DIL2,
                                            # Triton: a tl.constexpr parameter or constant takes a plain Python value
                                            scale, K0, K1, K2, HAS_RPB, EVEN_D, WIDE, PRECISION, UPCAST, True,  # type: ignore[arg-type]
                                            TK0, TK1, TK2)
        acc = tl.where(poisoned[:, None] > 0, float("nan"), acc)

    # Every valid query attends to itself, so l_i > 0 on valid rows; invalid rows are not stored.
    l_safe = tl.where(q_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(tile_ptrs(O, g0, g1, g2, first0, first1, first2, r0, r1, r2, b, h, sob, so0, so1, so2, soh, sod, dims,
                       DIL0, DIL1, DIL2, WIDE), out.to(O.dtype.element_ty), mask=row_mask)
    x0, x1, x2 = g0 + DIL0 * i0, g1 + DIL1 * i1, g2 + DIL2 * i2
    lse_rows = (((b * L0 + x0) * L1 + x1) * L2 + x2) * H + h
    tl.store(LSE + lse_rows, m_i + tl.log2(l_safe) * LN2, mask=q_ok)


def narrow_offsets(*tensors: torch.Tensor) -> bool:
    """Whether every element offset of `tensors` fits in int32 (the kernels then skip 64-bit offset arithmetic)."""
    limit = 2**31 - 1
    for t in tensors:
        span = t.storage_offset() + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if span > limit:
            return False
    return True


def na_forward(
    problem: Problem,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward kernel.

    Returns:
        ``out`` ``[B, *S, H, D]`` contiguous in `query`'s dtype and ``lse`` ``[B, *S, H]`` float32 (natural log).
    """
    geo, n = Geometry.of(problem), problem.n
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
    rpb_arg = rpb.contiguous() if rpb is not None else out  # rpb: a dummy pointer when absent (never read)

    def grid(meta):
        return launch_grid(geo, (meta["TQ0"], meta["TQ1"], meta["TQ2"]), problem.batch, problem.heads)

    mode = autotune_mode()
    kernel = tuned(_na_fwd_kernel, "fwd", n, mode, problem.head_dim)
    with launching("forward", "fwd", problem, mode):
        kernel[grid](
            query, key, value, rpb_arg, out, lse,
            *strides6(query, n), *strides6(key, n), *strides6(value, n), *strides6(out, n),
            B=problem.batch, **geo.sizes(), H=problem.heads, HEAD_DIM=problem.head_dim, scale=problem.scale,
            **geo.constexprs(), HAS_RPB=rpb is not None, BLOCK_D=head_block(problem.head_dim),
            EVEN_D=head_block(problem.head_dim) == problem.head_dim, WIDE=not narrow_offsets(query, key, value, out),
            PRECISION=dot_precision(query.dtype), UPCAST=upcast_operands(query.dtype),
        )
    return out, lse
