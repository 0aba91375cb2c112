"""Fused neighborhood-attention forward kernel (online softmax over the neighbourhood, FlashAttention style).

Supports: 1-D/2-D/3-D (padded to three axes), per-axis kernel size (odd and even), stride, dilation (lengths not
divisible by it) and causal flag; optional rpb (any float dtype, added in float32); custom scale; float32 (IEEE or
TF32 products), float16 and bfloat16 inputs with float32 accumulation; head dims up to 256 (the block is the next
power of two >= 16, loads masked on the head dim); arbitrary input strides (no copies).

Design: one program per (multi-dimensional query tile of one dilation group, head, batch). The tile's key region is
the halo box ``[start(i_first), end(i_last))`` per axis (spec 2.4.2), walked in key sub-tiles; an exact per-pair
mask (each query's own window on every axis) selects the neighbourhood. Dilation is strided indexing: a tile holds
in-group indices, global coordinates are ``g + d * i``. Writes ``out`` and the natural-log ``lse``; the
``N x prod(k)`` attention matrix never reaches global memory.

Tested: under the Triton interpreter on CPU (tests/test_triton.py) against the dense float64 oracle.
Known limits: see docs/kernels.md (GPU numbers and GPU correctness are verified by tests/test_gpu.py only where a
GPU was available).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..validation import Problem
from .tiling import (
    AUTOTUNE_KEY,
    bias_block,
    configs,
    dot_operand,
    interpreting,
    row_offsets,
    split3,
    tile_origin,
    window,
)

LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class Geometry:
    """A problem padded to three spatial axes, as the kernels see it."""

    spatial: tuple[int, int, int]
    kernel_size: tuple[int, int, int]
    stride: tuple[int, int, int]
    dilation: tuple[int, int, int]
    is_causal: tuple[bool, bool, bool]

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


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE products for float32 unless PyTorch allows TF32 for matmuls; 16-bit inputs ignore the setting."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def upcast_operands(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bfloat16 ``tl.dot`` operands wrongly (triton 3.9); give it float32 operands."""
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def _na_fwd_kernel(
    Q, K, V, RPB, O, LSE,  # q/k/v/o: [B, L0, L1, L2, H, D] (strided); rpb: [H, R0, R1, R2]; lse: [B, L0, L1, L2, H]
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sob, so0, so1, so2, soh, sod,
    L0, L1, L2, DIL0, DIL1, DIL2, H, HEAD_DIM, scale_log2,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    HAS_RPB: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
):
    BQ: tl.constexpr = TQ0 * TQ1 * TQ2
    BK: tl.constexpr = TK0 * TK1 * TK2
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    # Program id 0 = (query tile, dilation group), groups fastest.
    g0, g1, g2, lg0, lg1, lg2, first0, first1, first2 = tile_origin(
        tl.program_id(0), L0, L1, L2, DIL0, DIL1, DIL2, TQ0, TQ1, TQ2
    )

    rows = tl.arange(0, BQ)
    r0, r1, r2 = split3(rows, TQ1, TQ2)
    i0, i1, i2 = first0 + r0, first1 + r1, first2 + r2  # [BQ] in-group query indices
    q_ok = (i0 < lg0) & (i1 < lg1) & (i2 < lg2)
    qs0, qe0 = window(i0, lg0, K0, S0, C0)
    qs1, qe1 = window(i1, lg1, K1, S1, C1)
    qs2, qe2 = window(i2, lg2, K2, S2, C2)

    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q_rows = row_offsets(b, h, g0 + DIL0 * i0, g1 + DIL1 * i1, g2 + DIL2 * i2, sqb, sq0, sq1, sq2, sqh)
    q = tl.load(Q + q_rows[:, None] + dims[None, :].to(tl.int64) * sqd, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    q = dot_operand(q, UPCAST)

    # Halo box of the tile (spec 2.4.2); empty when the tile lies past the end of a short group.
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

    cols = tl.arange(0, BK)
    c0, c1, c2 = split3(cols, TK1, TK2)
    m_i = tl.full([BQ], float("-inf"), tl.float32)  # running max, base-2 logits
    l_i = tl.zeros([BQ], tl.float32)  # running sum of exp2
    acc = tl.zeros([BQ, BLOCK_D], tl.float32)
    for kt in range(nk0 * nk1 * nk2):
        u0, u1, u2 = split3(kt, nk1, nk2)
        j0 = box0 + u0 * TK0 + c0  # [BK] in-group key indices
        j1 = box1 + u1 * TK1 + c1
        j2 = box2 + u2 * TK2 + c2
        k_ok = (j0 < end0) & (j1 < end1) & (j2 < end2)
        k_rows = row_offsets(b, h, g0 + DIL0 * j0, g1 + DIL1 * j1, g2 + DIL2 * j2, skb, sk0, sk1, sk2, skh)
        v_rows = row_offsets(b, h, g0 + DIL0 * j0, g1 + DIL1 * j1, g2 + DIL2 * j2, svb, sv0, sv1, sv2, svh)
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + k_rows[:, None] + dims[None, :].to(tl.int64) * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + v_rows[:, None] + dims[None, :].to(tl.int64) * svd, mask=kv_mask, other=0.0)
        k = dot_operand(k, UPCAST)
        v = dot_operand(v, UPCAST)
        # Exact neighbourhood of every query: its own window on each axis ([BQ, BK]).
        pair = q_ok[:, None] & k_ok[None, :]
        pair &= (qs0[:, None] <= j0[None, :]) & (j0[None, :] < qe0[:, None])
        pair &= (qs1[:, None] <= j1[None, :]) & (j1[None, :] < qe1[:, None])
        pair &= (qs2[:, None] <= j2[None, :]) & (j2[None, :] < qe2[:, None])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if HAS_RPB:
            bias = bias_block(RPB, h, i0[:, None], i1[:, None], i2[:, None], j0[None, :], j1[None, :], j2[None, :],
                              pair, K0, K1, K2)
            s += bias * LOG2E
        s = tl.where(pair, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no key in this sub-tile (and none before) keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Every valid query attends to itself (spec 2.4.1), so l_i > 0 on valid rows; invalid rows are not stored.
    l_safe = tl.where(q_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    x0, x1, x2 = g0 + DIL0 * i0, g1 + DIL1 * i1, g2 + DIL2 * i2
    o_rows = row_offsets(b, h, x0, x1, x2, sob, so0, so1, so2, soh)
    tl.store(O + o_rows[:, None] + dims[None, :].to(tl.int64) * sod, out.to(O.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])
    lse_rows = (((b * L0 + x0) * L1 + x1) * L2 + x2) * H + h
    tl.store(LSE + lse_rows, (m_i + tl.log2(l_safe)) * LN2, mask=q_ok)


_fwd_tuned = {rank: triton.autotune(configs=configs(rank), key=AUTOTUNE_KEY)(_na_fwd_kernel) for rank in (1, 2, 3)}


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
        return (geo.num_tiles((meta["TQ0"], meta["TQ1"], meta["TQ2"])), problem.heads, problem.batch)

    _fwd_tuned[n][grid](
        query, key, value, rpb_arg, out, lse,
        *strides6(query, n), *strides6(key, n), *strides6(value, n), *strides6(out, n),
        **geo.sizes(), H=problem.heads, HEAD_DIM=problem.head_dim, scale_log2=problem.scale * LOG2E,
        **geo.constexprs(), HAS_RPB=rpb is not None, BLOCK_D=head_block(problem.head_dim),
        PRECISION=dot_precision(query.dtype), UPCAST=upcast_operands(query.dtype),
    )
    return out, lse
