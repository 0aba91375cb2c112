"""Fused neighborhood-attention backward kernels: dQ, dK/dV and d_rpb (spec 2.7).

Supports everything the forward kernel supports (see forward.py), including a gradient flowing into ``lse``:
``Delta = <dO, O> - dLSE`` is computed once per query (float32) before the kernels run.

* ``_na_bwd_dq_kernel``: one program per query tile (as in the forward), walking the halo box of keys; recomputes
  ``P`` from the saved natural-log ``lse`` and writes ``dQ = scale * dS @ K``.
* ``_na_bwd_dkdv_kernel``: one program per multi-dimensional key tile of one dilation group. The queries that
  attend to a key range form the box ``[qs(j_first), qe(j_last))`` per axis (inverse neighbourhood, spec 2.6, the
  same formulas as ``ops/neighborhood/indexing.py::inverse_window``); it walks that box in query sub-tiles with the
  exact forward mask and accumulates ``dV = P^T dO`` and ``dK = scale * dS^T Q`` in registers. Each program owns
  its output rows: no atomics, so dQ, dK and dV are deterministic.
* ``_na_bwd_drpb_kernel``: ``d_rpb`` is a segmented reduction of ``dS`` over every (batch, query, key) pair with
  the same offset. One program per (block of queries, head, batch) loops over the ``prod(k)`` window slots of its
  queries, recomputes ``dS`` for that slot, and reduces it into a per-program partial table of
  ``prod(2k-1)`` entries (one-hot sums in registers). The partial table is then either added to the ``[H, R]``
  result with one atomic add per entry (default), or, when ``torch.are_deterministic_algorithms_enabled()``, stored
  to a ``[programs, H, R]`` buffer that PyTorch sums in a fixed order. No ``N x prod(k)`` intermediate exists.

Tested: under the Triton interpreter on CPU (tests/test_triton.py) against autograd through the dense float64
oracle, in both d_rpb modes. Known limits: the d_rpb kernel uses CUDA-core dot products and a one-hot reduction
whose cost grows with ``prod(2k-1)`` (next power of two); see docs/kernels.md.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..validation import Problem
from .forward import LOG2E, Geometry, dot_precision, head_block, strides6, upcast_operands
from .tiling import (
    AUTOTUNE_KEY,
    DRPB_BLOCK_Q,
    bias_block,
    configs,
    dot_operand,
    inverse_window,
    row_offsets,
    split3,
    tile_origin,
    window,
)


@triton.jit
def _na_bwd_dq_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, DQ,  # q/k/v/do/dq: [B, L0, L1, L2, H, D] strided; lse/delta: [B, L0, L1, L2, H]
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sdb, sd0, sd1, sd2, sdh, sdd,
    sgb, sg0, sg1, sg2, sgh, sgd,
    L0, L1, L2, DIL0, DIL1, DIL2, H, HEAD_DIM, scale, scale_log2,
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
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    g0, g1, g2, lg0, lg1, lg2, first0, first1, first2 = tile_origin(
        tl.program_id(0), L0, L1, L2, DIL0, DIL1, DIL2, TQ0, TQ1, TQ2
    )

    r0, r1, r2 = split3(tl.arange(0, BQ), TQ1, TQ2)
    i0, i1, i2 = first0 + r0, first1 + r1, first2 + r2  # [BQ] in-group query indices
    q_ok = (i0 < lg0) & (i1 < lg1) & (i2 < lg2)
    qs0, qe0 = window(i0, lg0, K0, S0, C0)
    qs1, qe1 = window(i1, lg1, K1, S1, C1)
    qs2, qe2 = window(i2, lg2, K2, S2, C2)
    x0, x1, x2 = g0 + DIL0 * i0, g1 + DIL1 * i1, g2 + DIL2 * i2

    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    dq_mask = q_ok[:, None] & d_ok[None, :]
    dcol = dims[None, :].to(tl.int64)
    q = tl.load(Q + row_offsets(b, h, x0, x1, x2, sqb, sq0, sq1, sq2, sqh)[:, None] + dcol * sqd, mask=dq_mask,
                other=0.0)
    do = tl.load(DO + row_offsets(b, h, x0, x1, x2, sdb, sd0, sd1, sd2, sdh)[:, None] + dcol * sdd, mask=dq_mask,
                 other=0.0)
    q = dot_operand(q, UPCAST)
    do = dot_operand(do, UPCAST)
    stat_rows = (((b * L0 + x0) * L1 + x1) * L2 + x2) * H + h
    lse2 = tl.load(LSE + stat_rows, mask=q_ok, other=0.0) * LOG2E  # natural -> base-2 log-sum-exp
    delta = tl.load(DELTA + stat_rows, mask=q_ok, other=0.0)

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

    c0, c1, c2 = split3(tl.arange(0, BK), TK1, TK2)
    dq = tl.zeros([BQ, BLOCK_D], tl.float32)
    for kt in range(nk0 * nk1 * nk2):
        u0, u1, u2 = split3(kt, nk1, nk2)
        j0 = box0 + u0 * TK0 + c0  # [BK] in-group key indices
        j1 = box1 + u1 * TK1 + c1
        j2 = box2 + u2 * TK2 + c2
        k_ok = (j0 < end0) & (j1 < end1) & (j2 < end2)
        y0, y1, y2 = g0 + DIL0 * j0, g1 + DIL1 * j1, g2 + DIL2 * j2
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + row_offsets(b, h, y0, y1, y2, skb, sk0, sk1, sk2, skh)[:, None] + dcol * skd, mask=kv_mask,
                    other=0.0)
        v = tl.load(V + row_offsets(b, h, y0, y1, y2, svb, sv0, sv1, sv2, svh)[:, None] + dcol * svd, mask=kv_mask,
                    other=0.0)
        k = dot_operand(k, UPCAST)
        v = dot_operand(v, UPCAST)
        pair = q_ok[:, None] & k_ok[None, :]
        pair &= (qs0[:, None] <= j0[None, :]) & (j0[None, :] < qe0[:, None])
        pair &= (qs1[:, None] <= j1[None, :]) & (j1[None, :] < qe1[:, None])
        pair &= (qs2[:, None] <= j2[None, :]) & (j2[None, :] < qe2[:, None])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BQ, BK]
        if HAS_RPB:
            bias = bias_block(RPB, h, i0[:, None], i1[:, None], i2[:, None], j0[None, :], j1[None, :], j2[None, :],
                              pair, K0, K1, K2)
            s += bias * LOG2E
        p = tl.where(pair, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BQ, BK]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)

    dq *= scale
    tl.store(DQ + row_offsets(b, h, x0, x1, x2, sgb, sg0, sg1, sg2, sgh)[:, None] + dcol * sgd,
             dq.to(DQ.dtype.element_ty), mask=dq_mask)


@triton.jit
def _na_bwd_dkdv_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, DK, DV,  # dk/dv: [B, L0, L1, L2, H, D] with the strides of sgb..sgd
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sdb, sd0, sd1, sd2, sdh, sdd,
    sgb, sg0, sg1, sg2, sgh, sgd,
    L0, L1, L2, DIL0, DIL1, DIL2, H, HEAD_DIM, scale, scale_log2,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    HAS_RPB: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
):
    # Rows of this program are keys (a TK tile); the inner loop walks query sub-tiles (TQ).
    BQ: tl.constexpr = TQ0 * TQ1 * TQ2
    BK: tl.constexpr = TK0 * TK1 * TK2
    LOG2E: tl.constexpr = 1.4426950408889634
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    g0, g1, g2, lg0, lg1, lg2, first0, first1, first2 = tile_origin(
        tl.program_id(0), L0, L1, L2, DIL0, DIL1, DIL2, TK0, TK1, TK2
    )

    r0, r1, r2 = split3(tl.arange(0, BK), TK1, TK2)
    j0, j1, j2 = first0 + r0, first1 + r1, first2 + r2  # [BK] in-group key indices
    k_ok = (j0 < lg0) & (j1 < lg1) & (j2 < lg2)
    y0, y1, y2 = g0 + DIL0 * j0, g1 + DIL1 * j1, g2 + DIL2 * j2

    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    dcol = dims[None, :].to(tl.int64)
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + row_offsets(b, h, y0, y1, y2, skb, sk0, sk1, sk2, skh)[:, None] + dcol * skd, mask=kv_mask,
                other=0.0)
    v = tl.load(V + row_offsets(b, h, y0, y1, y2, svb, sv0, sv1, sv2, svh)[:, None] + dcol * svd, mask=kv_mask,
                other=0.0)
    k = dot_operand(k, UPCAST)
    v = dot_operand(v, UPCAST)

    # Inverse-neighbourhood box: qs/qe are non-decreasing in j (spec 2.4.3).
    box0, _ = inverse_window(first0, lg0, K0, S0, C0)
    box1, _ = inverse_window(first1, lg1, K1, S1, C1)
    box2, _ = inverse_window(first2, lg2, K2, S2, C2)
    _, end0 = inverse_window(tl.minimum(first0 + TK0 - 1, lg0 - 1), lg0, K0, S0, C0)
    _, end1 = inverse_window(tl.minimum(first1 + TK1 - 1, lg1 - 1), lg1, K1, S1, C1)
    _, end2 = inverse_window(tl.minimum(first2 + TK2 - 1, lg2 - 1), lg2, K2, S2, C2)
    tile_ok = (first0 < lg0) & (first1 < lg1) & (first2 < lg2)
    nq0 = tl.where(tile_ok, tl.cdiv(end0 - box0, TQ0), 0)
    nq1 = tl.cdiv(end1 - box1, TQ1)
    nq2 = tl.cdiv(end2 - box2, TQ2)

    c0, c1, c2 = split3(tl.arange(0, BQ), TQ1, TQ2)
    dk = tl.zeros([BK, BLOCK_D], tl.float32)
    dv = tl.zeros([BK, BLOCK_D], tl.float32)
    for qt in range(nq0 * nq1 * nq2):
        u0, u1, u2 = split3(qt, nq1, nq2)
        i0 = box0 + u0 * TQ0 + c0  # [BQ] in-group query indices
        i1 = box1 + u1 * TQ1 + c1
        i2 = box2 + u2 * TQ2 + c2
        q_ok = (i0 < end0) & (i1 < end1) & (i2 < end2)
        x0, x1, x2 = g0 + DIL0 * i0, g1 + DIL1 * i1, g2 + DIL2 * i2
        q_mask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + row_offsets(b, h, x0, x1, x2, sqb, sq0, sq1, sq2, sqh)[:, None] + dcol * sqd, mask=q_mask,
                    other=0.0)
        do = tl.load(DO + row_offsets(b, h, x0, x1, x2, sdb, sd0, sd1, sd2, sdh)[:, None] + dcol * sdd,
                     mask=q_mask, other=0.0)
        q = dot_operand(q, UPCAST)
        do = dot_operand(do, UPCAST)
        stat_rows = (((b * L0 + x0) * L1 + x1) * L2 + x2) * H + h
        lse2 = tl.load(LSE + stat_rows, mask=q_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + stat_rows, mask=q_ok, other=0.0)
        # The forward mask, transposed: key row j is attended by query column i iff j is in i's window.
        qs0, qe0 = window(i0, lg0, K0, S0, C0)
        qs1, qe1 = window(i1, lg1, K1, S1, C1)
        qs2, qe2 = window(i2, lg2, K2, S2, C2)
        pair = k_ok[:, None] & q_ok[None, :]
        pair &= (qs0[None, :] <= j0[:, None]) & (j0[:, None] < qe0[None, :])
        pair &= (qs1[None, :] <= j1[:, None]) & (j1[:, None] < qe1[None, :])
        pair &= (qs2[None, :] <= j2[:, None]) & (j2[:, None] < qe2[None, :])
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2  # [BK, BQ]
        if HAS_RPB:
            bias = bias_block(RPB, h, i0[None, :], i1[None, :], i2[None, :], j0[:, None], j1[:, None], j2[:, None],
                              pair, K0, K1, K2)
            st += bias * LOG2E
        pt = tl.where(pair, tl.exp2(st - lse2[None, :]), 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BK, BQ]
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)

    dk *= scale
    out_rows = row_offsets(b, h, y0, y1, y2, sgb, sg0, sg1, sg2, sgh)[:, None] + dcol * sgd
    tl.store(DK + out_rows, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_rows, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _na_bwd_drpb_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, TABLE,  # TABLE: [H, R] (atomic mode) or [B * blocks, H, R] (deterministic)
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sdb, sd0, sd1, sd2, sdh, sdd,
    L0, L1, L2, DIL0, DIL1, DIL2, H, HEAD_DIM, scale_log2,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    R: tl.constexpr = (2 * K0 - 1) * R1 * R2
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    qb = tl.program_id(0)
    # A flat block of query tokens (any dilation groups); rpb implies stride 1 on every axis (spec 3.3).
    x = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = x < L0 * L1 * L2
    x0, x1, x2 = split3(x, L1, L2)
    g0, g1, g2 = x0 % DIL0, x1 % DIL1, x2 % DIL2
    i0, i1, i2 = x0 // DIL0, x1 // DIL1, x2 // DIL2
    lg0 = (L0 - g0 + DIL0 - 1) // DIL0
    lg1 = (L1 - g1 + DIL1 - 1) // DIL1
    lg2 = (L2 - g2 + DIL2 - 1) // DIL2
    qs0, qe0 = window(i0, lg0, K0, 1, C0)
    qs1, qe1 = window(i1, lg1, K1, 1, C1)
    qs2, qe2 = window(i2, lg2, K2, 1, C2)

    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    dcol = dims[None, :].to(tl.int64)
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + row_offsets(b, h, x0, x1, x2, sqb, sq0, sq1, sq2, sqh)[:, None] + dcol * sqd, mask=q_mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + row_offsets(b, h, x0, x1, x2, sdb, sd0, sd1, sd2, sdh)[:, None] + dcol * sdd, mask=q_mask,
                 other=0.0).to(tl.float32)
    stat_rows = (((b * L0 + x0) * L1 + x1) * L2 + x2) * H + h
    lse2 = tl.load(LSE + stat_rows, mask=q_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + stat_rows, mask=q_ok, other=0.0)

    bins = tl.arange(0, BLOCK_R)
    part = tl.zeros([BLOCK_R], tl.float32)  # this program's partial d_rpb[h, :]
    for m in range(K0 * K1 * K2):
        m0, m1, m2 = split3(m, K1, K2)
        j0, j1, j2 = qs0 + m0, qs1 + m1, qs2 + m2  # slot m of each query's window
        ok = q_ok & (j0 < qe0) & (j1 < qe1) & (j2 < qe2)  # causal windows may hold fewer than k keys
        y0, y1, y2 = g0 + DIL0 * j0, g1 + DIL1 * j1, g2 + DIL2 * j2
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(K + row_offsets(b, h, y0, y1, y2, skb, sk0, sk1, sk2, skh)[:, None] + dcol * skd, mask=kv_mask,
                    other=0.0).to(tl.float32)
        v = tl.load(V + row_offsets(b, h, y0, y1, y2, svb, sv0, sv1, sv2, svh)[:, None] + dcol * svd, mask=kv_mask,
                    other=0.0).to(tl.float32)
        r = ((K0 - 1 + j0 - i0) * R1 + (K1 - 1 + j1 - i1)) * R2 + (K2 - 1 + j2 - i2)  # [BLOCK_Q] flat rpb index
        bias = tl.load(RPB + h * R + r, mask=ok, other=0.0).to(tl.float32)
        s = tl.sum(q * k, 1) * scale_log2 + bias * LOG2E
        p = tl.exp2(s - lse2)
        ds = tl.where(ok, p * (tl.sum(do * v, 1) - delta), 0.0)
        part += tl.sum(tl.where(r[:, None] == bins[None, :], ds[:, None], 0.0), 0)

    if DETERMINISTIC:
        row = (b * tl.num_programs(0) + qb) * H + h
        tl.store(TABLE + row * R + bins, part, mask=bins < R)
    else:
        tl.atomic_add(TABLE + h * R + bins, part, mask=bins < R, sem="relaxed")


_dq_tuned = {rank: triton.autotune(configs=configs(rank), key=AUTOTUNE_KEY)(_na_bwd_dq_kernel) for rank in (1, 2, 3)}
_dkdv_tuned = {
    rank: triton.autotune(configs=configs(rank), key=AUTOTUNE_KEY)(_na_bwd_dkdv_kernel) for rank in (1, 2, 3)
}


def na_backward(
    problem: Problem,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launches the backward kernels.

    Args:
        grad_out: ``dO`` ``[B, *S, H, D]``, any strides.
        grad_lse: ``dLSE`` ``[B, *S, H]`` or None.
        out: The forward output.
        lse: The forward natural-log ``lse`` ``[B, *S, H]`` float32, contiguous.
        deterministic: Reduce d_rpb without atomics.

    Returns:
        ``dq, dk, dv`` (contiguous, dtype of `query`) and ``d_rpb`` in ``rpb.dtype`` (None without rpb).
    """
    geo, n = Geometry.of(problem), problem.n
    # Delta = <dO, O> - dLSE per query (spec 2.7), float32 [B, *S, H].
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    dq = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    dk = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    dv = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    rpb_c = rpb.contiguous() if rpb is not None else dq  # dummy pointer when absent (never read)
    strides = (*strides6(query, n), *strides6(key, n), *strides6(value, n), *strides6(grad_out, n),
               *strides6(dq, n))
    common = dict(**geo.sizes(), H=problem.heads, HEAD_DIM=problem.head_dim, scale=problem.scale,
                  scale_log2=problem.scale * LOG2E, **geo.constexprs(), HAS_RPB=rpb is not None,
                  BLOCK_D=head_block(problem.head_dim), PRECISION=dot_precision(query.dtype),
                  UPCAST=upcast_operands(query.dtype))

    def grid_q(meta):
        return (geo.num_tiles((meta["TQ0"], meta["TQ1"], meta["TQ2"])), problem.heads, problem.batch)

    def grid_k(meta):
        return (geo.num_tiles((meta["TK0"], meta["TK1"], meta["TK2"])), problem.heads, problem.batch)

    _dq_tuned[n][grid_q](query, key, value, rpb_c, grad_out, lse, delta, dq, *strides, **common)
    _dkdv_tuned[n][grid_k](query, key, value, rpb_c, grad_out, lse, delta, dk, dv, *strides, **common)

    d_rpb = None
    if rpb is not None:
        table_size = math.prod(2 * k - 1 for k in geo.kernel_size)
        blocks = triton.cdiv(problem.num_tokens, DRPB_BLOCK_Q)
        if deterministic:
            table = torch.empty((problem.batch * blocks, problem.heads, table_size), dtype=torch.float32,
                                device=query.device)
        else:
            table = torch.zeros((problem.heads, table_size), dtype=torch.float32, device=query.device)
        k0, k1, k2 = geo.kernel_size
        c0, c1, c2 = geo.is_causal
        _na_bwd_drpb_kernel[(blocks, problem.heads, problem.batch)](
            query, key, value, rpb_c, grad_out, lse, delta, table, *strides[:24],
            **geo.sizes(), H=problem.heads, HEAD_DIM=problem.head_dim, scale_log2=problem.scale * LOG2E,
            K0=k0, K1=k1, K2=k2, C0=c0, C1=c1, C2=c2, BLOCK_D=head_block(problem.head_dim),
            BLOCK_Q=DRPB_BLOCK_Q, BLOCK_R=triton.next_power_of_2(table_size), DETERMINISTIC=deterministic,
        )
        if deterministic:
            table = table.sum(0)  # fixed-order reduction over the per-program partial tables
        d_rpb = table.view(rpb.shape).to(rpb.dtype)
    return dq, dk, dv, d_rpb
