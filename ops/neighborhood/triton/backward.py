"""Fused neighborhood-attention backward kernels: dQ (with Delta and d_rpb folded in) and dK/dV.

Supports everything the forward kernel supports (see forward.py), including a gradient flowing into ``lse``, and
computes only the gradients autograd asks for (``ctx.needs_input_grad``).

* ``_na_bwd_dq_kernel``: one program per query tile (as in the forward), walking the halo box of keys. Its prologue
  computes ``Delta = rowsum(dO * O) - dLSE`` for its queries (float32, in registers) and stores it for the dK/dV
  pass, which runs after it on the same stream. The loop recomputes ``P`` from the saved natural-log ``lse`` and
  accumulates ``dQ = scale * dS @ K`` and, when rpb needs a gradient, this program's partial ``d_rpb`` table:
  ``dS`` of one (query tile, key sub-tile) pair is summed over the pairs sharing an rpb offset with three small
  one-hot tensor-core products (``tiling.rpb_partial``; ``tl.gather`` sums in 1-D). No pass over K/V of its own, and
  no ``N x prod(k)`` intermediate. The partial table is added with one atomic per entry into one of 32 copies of
  ``[H, R]`` that PyTorch sums (default), or, under ``torch.use_deterministic_algorithms(True)``, stored to a
  ``[programs, H, R]`` buffer that PyTorch sums in a fixed order (bit-reproducible).
* ``_na_bwd_dkdv_kernel``: one program per multi-dimensional key tile of one dilation group. The queries that attend
  to a key range form the box ``[qs(j_first), qe(j_last))`` per axis (inverse neighbourhood, the same formulas as
  ``ops/neighborhood/indexing.py::inverse_window``); it walks that box in query sub-tiles with the exact forward
  mask and accumulates ``dV = P^T dO`` and ``dK = scale * dS^T Q`` in registers. Each program owns its output rows:
  no atomics, so dQ, dK and dV are deterministic.

Non-finite inputs: as in the forward, a program whose dQ or dK rows end non-finite reruns its loop with the keys
sanitised (dQ) or the masked slots of ``dS`` selected to zero (dK), so that a NaN/inf key or value reaches exactly the
gradient rows the chain rule says; dV never needs it. ``d_rpb`` is the exception: once any ``dS`` of a head is
non-finite, the one-hot products spread it over that head's whole table.

Tested: under the Triton interpreter on CPU (tests/test_triton.py) against autograd through the dense float64
oracle, in both d_rpb modes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..validation import Problem
from .forward import (
    Geometry,
    dot_precision,
    head_block,
    key_sub_tile_scores,
    launch_grid,
    narrow_offsets,
    query_tile,
    strides6,
    sub_tile_offsets,
    tile_base,
    tile_ptrs,
    tile_step,
    upcast_operands,
)
from .tiling import (
    LOG2E,
    advance,
    autotune_mode,
    axis_offsets,
    box_coords,
    config_entries,
    dot_operand,
    finite_rows,
    inverse_window,
    inwin,
    launching,
    program_batch,
    rpb_partial,
    rpb_partial_1d,
    tile_origin,
    tuned,
    window,
)

# Copies of the d_rpb table that the atomic adds are spread over (fewer programs contend for one address).
ATOMIC_COPIES = 32


@triton.jit
def _dq_loop(dq, table, q, do, lse2, delta, k_base, v_base, rpb_base, n_trips, nk1, nk2,
             box0, box1, box2, end0, end1, end2, first0, first1, first2, q_ok, qs0, qs1, qs2, w0, w1, w2, brow,
             dims, d_ok, sk0, sk1, sk2, skd, sv0, sv1, sv2, svd, DIL0, DIL1, DIL2, scale,
             K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
             HAS_RPB: tl.constexpr, COMPUTE_DQ: tl.constexpr, COMPUTE_DRPB: tl.constexpr, EVEN_D: tl.constexpr,
             WIDE: tl.constexpr, PRECISION: tl.constexpr, RPB_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
             GUARD: tl.constexpr,
             TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
             TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
             RANK: tl.constexpr, R0P: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr, FI: tl.constexpr):
    """dQ and the partial d_rpb table over the halo box in key sub-tiles (`qs_a` relative to the box start).

    `GUARD` is the rerun of a tile with a non-finite dQ row: keys are sanitised and the slots of non-finite keys
    become NaN in ``dS``, so a bad key reaches only its own queries' rows.
    """
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    c0, c1, c2, koff = sub_tile_offsets(dims, sk0, sk1, sk2, skd, DIL0, DIL1, DIL2, WIDE, TK0, TK1, TK2)
    _c0, _c1, _c2, voff = sub_tile_offsets(dims, sv0, sv1, sv2, svd, DIL0, DIL1, DIL2, WIDE, TK0, TK1, TK2)
    bcol = (c0 * R1 + c1) * R2 + c2
    u0 = tl.full([], 0, tl.int32)
    u1 = tl.full([], 0, tl.int32)
    u2 = tl.full([], 0, tl.int32)
    for _ in range(n_trips):
        k, v, pair, s, o0, o1, o2 = key_sub_tile_scores(
            q, k_base, v_base, rpb_base, koff, voff, u0, u1, u2, c0, c1, c2, bcol, brow, box0, box1, box2,
            end0, end1, end2, q_ok, qs0, qs1, qs2, w0, w1, w2, d_ok, sk0, sk1, sk2, sv0, sv1, sv2, DIL0, DIL1, DIL2,
            # Triton: a tl.constexpr parameter or constant takes a plain Python value
            scale, K0, K1, K2, HAS_RPB, EVEN_D, PRECISION, UPCAST, 0.0, TK0, TK1, TK2)  # type: ignore[arg-type]
        # Triton's language builtins carry no return types
        p = tl.exp2(s * LOG2E - lse2[:, None])  # type: ignore[var-annotated]
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BQ, BK]
        ds = tl.where(pair, p * (dp - delta[:, None]), 0.0)
        if GUARD:
            k_fin = tl.abs(k.to(tl.float32)) < float("inf")
            bad = tl.sum(tl.where(k_fin, 0, 1), 1) > 0
            k = tl.where(k_fin, k, 0.0).to(k.dtype)
            ds = tl.where(pair & bad[None, :], float("nan"), ds)
        if COMPUTE_DQ:
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        if COMPUTE_DRPB:
            # off_a = (k_a - 1) + sub-tile origin - tile origin: the rpb bin of the (first row, first column) pair.
            off0 = K0 - 1 + box0 + o0 - first0
            off1 = K1 - 1 + box1 + o1 - first1
            off2 = K2 - 1 + box2 + o2 - first2
            if RANK == 1:
                table += rpb_partial_1d(ds, off0, TQ0, TK0, R0P, FI)
            else:
                table += rpb_partial(ds, off0, off1, off2, TQ0, TQ1, TQ2, TK0, TK1, TK2, RANK, R0P, R1P, R2P, FI,
                                     RPB_PRECISION)
        u0, u1, u2 = advance(u0, u1, u2, nk1, nk2)
    return dq, table


@triton.jit
def _na_bwd_dq_kernel(
    Q, K, V, RPB, O, DO, LSE, DLSE, DELTA, DQ, TABLE,  # lse/dlse/delta: [B, L0, L1, L2, H] float32, contiguous
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sob, so0, so1, so2, soh, sod,
    sdb, sd0, sd1, sd2, sdh, sdd,
    sgb, sg0, sg1, sg2, sgh, sgd,
    B, L0, L1, L2, DIL0, DIL1, DIL2, H, HEAD_DIM, scale,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    HAS_RPB: tl.constexpr, HAS_DLSE: tl.constexpr, STORE_DELTA: tl.constexpr,
    COMPUTE_DQ: tl.constexpr, COMPUTE_DRPB: tl.constexpr, DETERMINISTIC: tl.constexpr, COPIES: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, WIDE: tl.constexpr,
    PRECISION: tl.constexpr, RPB_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    RANK: tl.constexpr, R0P: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr, FI: tl.constexpr,
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
    do = tl.load(tile_ptrs(DO, g0, g1, g2, first0, first1, first2, r0, r1, r2, b, h, sdb, sd0, sd1, sd2, sdh, sdd,
                           dims, DIL0, DIL1, DIL2, WIDE), mask=row_mask, other=0.0)
    o = tl.load(tile_ptrs(O, g0, g1, g2, first0, first1, first2, r0, r1, r2, b, h, sob, so0, so1, so2, soh, sod,
                          dims, DIL0, DIL1, DIL2, WIDE), mask=row_mask, other=0.0)
    x0, x1, x2 = g0 + DIL0 * i0, g1 + DIL1 * i1, g2 + DIL2 * i2
    stat_rows = (((b * L0 + x0) * L1 + x1) * L2 + x2) * H + h
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # Delta = <dO, O> - dLSE per query
    if HAS_DLSE:
        delta -= tl.load(DLSE + stat_rows, mask=q_ok, other=0.0)
    if STORE_DELTA:
        tl.store(DELTA + stat_rows, delta, mask=q_ok)

    if RANK == 1:
        table = tl.zeros([R0P], tl.float32)
    elif RANK == 2:
        table = tl.zeros([R0P, R1P], tl.float32)
    else:
        table = tl.zeros([R0P * R1P, R2P], tl.float32)
    dq = tl.zeros([BQ, BLOCK_D], tl.float32)
    if COMPUTE_DQ or COMPUTE_DRPB:
        q = tl.load(tile_ptrs(Q, g0, g1, g2, first0, first1, first2, r0, r1, r2, b, h, sqb, sq0, sq1, sq2, sqh,
                              sqd, dims, DIL0, DIL1, DIL2, WIDE), mask=row_mask, other=0.0)
        q = dot_operand(q, UPCAST)
        do = dot_operand(do, UPCAST)
        lse2 = tl.load(LSE + stat_rows, mask=q_ok, other=0.0) * LOG2E  # natural -> base-2 log-sum-exp
        k_base = K + tile_base(g0, g1, g2, box0, box1, box2, b, h, skb, sk0, sk1, sk2, skh, DIL0, DIL1, DIL2)
        v_base = V + tile_base(g0, g1, g2, box0, box1, box2, b, h, svb, sv0, sv1, sv2, svh, DIL0, DIL1, DIL2)
        rpb_base = RPB + h * RH + (box0 * R1 + box1) * R2 + box2
        brow = ((K0 - 1 - i0) * R1 + (K1 - 1 - i1)) * R2 + (K2 - 1 - i2)
        dq, table = _dq_loop(dq, table, q, do, lse2, delta, k_base, v_base, rpb_base, n_trips, nk1, nk2,
                             box0, box1, box2, end0, end1, end2, first0, first1, first2, q_ok, qs0, qs1, qs2,
                             w0, w1, w2, brow, dims, d_ok, sk0, sk1, sk2, skd, sv0, sv1, sv2, svd, DIL0, DIL1, DIL2,
                             scale, K0, K1, K2, HAS_RPB, COMPUTE_DQ, COMPUTE_DRPB, EVEN_D, WIDE, PRECISION,
                             # Triton: a tl.constexpr parameter or constant takes a plain Python value
                             RPB_PRECISION, UPCAST, False, TQ0, TQ1, TQ2, TK0, TK1, TK2, RANK, R0P, R1P, R2P, FI)  # type: ignore[arg-type]
        if COMPUTE_DQ:  # noqa: SIM102 - a constexpr test around a run-time one
            if tl.max(tl.where(q_ok & ~finite_rows(dq), 1, 0)) > 0:
                dq, _rerun_table = _dq_loop(
                    tl.zeros([BQ, BLOCK_D], tl.float32), table, q, do, lse2, delta, k_base, v_base, rpb_base,
                    n_trips, nk1, nk2, box0, box1, box2, end0, end1, end2, first0, first1, first2, q_ok,
                    qs0, qs1, qs2, w0, w1, w2, brow, dims, d_ok, sk0, sk1, sk2, skd, sv0, sv1, sv2, svd,
                    # Triton: a tl.constexpr parameter or constant takes a plain Python value
                    DIL0, DIL1, DIL2, scale, K0, K1, K2, HAS_RPB, True, False, EVEN_D, WIDE, PRECISION,  # type: ignore[arg-type]
                    # Triton: a tl.constexpr parameter or constant takes a plain Python value
                    RPB_PRECISION, UPCAST, True, TQ0, TQ1, TQ2, TK0, TK1, TK2, RANK, R0P, R1P, R2P, FI)  # type: ignore[arg-type]
    if COMPUTE_DQ:
        tl.store(tile_ptrs(DQ, g0, g1, g2, first0, first1, first2, r0, r1, r2, b, h, sgb, sg0, sg1, sg2, sgh, sgd,
                           dims, DIL0, DIL1, DIL2, WIDE), (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)
    if COMPUTE_DRPB:
        R: tl.constexpr = RH
        if RANK == 1:
            r0 = tl.arange(0, R0P)
            flat = r0
            ok = r0 < 2 * K0 - 1
        elif RANK == 2:
            r0 = tl.arange(0, R0P)[:, None]
            r1 = tl.arange(0, R1P)[None, :]
            flat = r0 * R1 + r1
            ok = (r0 < 2 * K0 - 1) & (r1 < R1)
        else:
            ro = tl.arange(0, R0P * R1P)[:, None]
            r2 = tl.arange(0, R2P)[None, :]
            r0, r1 = ro // R1P, ro % R1P
            flat = (r0 * R1 + r1) * R2 + r2
            ok = (r0 < 2 * K0 - 1) & (r1 < R1) & (r2 < R2)
        if DETERMINISTIC:
            row = tl.program_id(0).to(tl.int64) * H + h  # program id 0 already counts (batch, tile)
            tl.store(TABLE + row * R + flat, table, mask=ok)
        else:
            copy = tl.program_id(0) % COPIES
            tl.atomic_add(TABLE + (copy * H + h) * R + flat, table, mask=ok, sem="relaxed")


@triton.jit
def pair_mask_t(j0, j1, j2, qs0, qs1, qs2, w0, w1, w2, q_ok,
                K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr):
    """``[BK, BQ]`` window mask of key rows (`j_a` ``[BK]``) against query columns.

    `qs_a`/`w_a` are scalars on axes where the query sub-tile is one wide (tested per key row, folded into the
    key index of the first other axis so that it fails) and ``[BQ]`` otherwise; `q_ok` ``[BQ]`` rides on the first
    ``[BQ]`` axis as a zero width.
    """
    # A key index whose distance to any window start exceeds any width. (Triton: a tl.constexpr constant takes a
    # plain Python value.)
    NEVER: tl.constexpr = -(1 << 30)  # type: ignore[assignment]
    rowok = j0 >= 0
    if TQ0 == 1 and K0 > 1:
        rowok = rowok & inwin(j0, qs0, w0)
    if TQ1 == 1 and K1 > 1:
        rowok = rowok & inwin(j1, qs1, w1)
    if TQ2 == 1 and K2 > 1:
        rowok = rowok & inwin(j2, qs2, w2)
    if TQ0 > 1:
        pair = inwin(tl.where(rowok, j0, NEVER)[:, None], qs0[None, :], tl.where(q_ok, w0, 0)[None, :])
        if TQ1 > 1:
            pair = pair & inwin(j1[:, None], qs1[None, :], w1[None, :])
        if TQ2 > 1:
            pair = pair & inwin(j2[:, None], qs2[None, :], w2[None, :])
    elif TQ1 > 1:
        pair = inwin(tl.where(rowok, j1, NEVER)[:, None], qs1[None, :], tl.where(q_ok, w1, 0)[None, :])
        if TQ2 > 1:
            pair = pair & inwin(j2[:, None], qs2[None, :], w2[None, :])
    else:
        pair = inwin(tl.where(rowok, j2, NEVER)[:, None], qs2[None, :], tl.where(q_ok, w2, 0)[None, :])
    return pair


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, rpb_base, n_trips, nq1, nq2,
               box0, box1, box2, end0, end1, end2, lg0, lg1, lg2, j0, j1, j2, krow, dims, d_ok,
               sq0, sq1, sq2, sqd, sd0, sd1, sd2, sdd, st0, st1, st2, DIL0, DIL1, DIL2, scale,
               K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
               S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
               C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
               HAS_RPB: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, EVEN_D: tl.constexpr,
               WIDE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, GUARD: tl.constexpr,
               TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr):
    """dK and dV over the inverse-neighbourhood box in query sub-tiles.

    `GUARD` is the rerun of a tile with a non-finite dK row: masked slots of ``dS`` then select 0 instead of
    multiplying it, so a non-finite Delta or dP stays in its own pairs.
    """
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    # Loop invariants: in-sub-tile query coordinates, their q/dO/statistics offsets and rpb column term.
    c0, c1, c2, qoff = sub_tile_offsets(dims, sq0, sq1, sq2, sqd, DIL0, DIL1, DIL2, WIDE, TQ0, TQ1, TQ2)
    _c0, _c1, _c2, dooff = sub_tile_offsets(dims, sd0, sd1, sd2, sdd, DIL0, DIL1, DIL2, WIDE, TQ0, TQ1, TQ2)
    soff = axis_offsets(c0, c1, c2, DIL0, DIL1, DIL2, st0, st1, st2, WIDE)
    ccol = (c0 * R1 + c1) * R2 + c2
    u0 = tl.full([], 0, tl.int32)
    u1 = tl.full([], 0, tl.int32)
    u2 = tl.full([], 0, tl.int32)
    for _ in range(n_trips):
        o0, o1, o2 = u0 * TQ0, u1 * TQ1, u2 * TQ2  # sub-tile origin relative to the inverse box
        q_ok = (c0 < end0 - box0 - o0) & (c1 < end1 - box1 - o1) & (c2 < end2 - box2 - o2)
        q_mask = q_ok[:, None] if EVEN_D else q_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + tile_step(o0, o1, o2, DIL0, DIL1, DIL2, sq0, sq1, sq2) + qoff, mask=q_mask, other=0.0)
        do = tl.load(do_base + tile_step(o0, o1, o2, DIL0, DIL1, DIL2, sd0, sd1, sd2) + dooff, mask=q_mask,
                     other=0.0)
        q = dot_operand(q, UPCAST)
        do = dot_operand(do, UPCAST)
        stat = tile_step(o0, o1, o2, DIL0, DIL1, DIL2, st0, st1, st2) + soff
        lse2 = tl.load(lse_base + stat, mask=q_ok, other=0.0) * LOG2E
        # Windows of the sub-tile's queries (a scalar on one-wide axes).
        if TQ0 == 1:
            i0 = box0 + o0
        else:
            i0 = box0 + o0 + c0
        if TQ1 == 1:
            i1 = box1 + o1
        else:
            i1 = box1 + o1 + c1
        if TQ2 == 1:
            i2 = box2 + o2
        else:
            i2 = box2 + o2 + c2
        qs0, qe0 = window(i0, lg0, K0, S0, C0)
        qs1, qe1 = window(i1, lg1, K1, S1, C1)
        qs2, qe2 = window(i2, lg2, K2, S2, C2)
        pair = pair_mask_t(j0, j1, j2, qs0, qs1, qs2, qe0 - qs0, qe1 - qs1, qe2 - qs2, q_ok, K0, K1, K2,
                           TQ0, TQ1, TQ2)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale  # [BK, BQ], natural units
        if HAS_RPB:
            it_ptr = rpb_base - (((box0 + o0) * R1 + box1 + o1) * R2 + box2 + o2)
            st += tl.load(it_ptr + (krow[:, None] - ccol[None, :]), mask=pair, other=0.0).to(tl.float32)
        # Triton's language builtins carry no return types
        pt_raw = tl.exp2(st * LOG2E - lse2[None, :])  # type: ignore[var-annotated]
        pt = tl.where(pair, pt_raw, 0.0)
        if COMPUTE_DV:
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        if COMPUTE_DK:
            delta = tl.load(delta_base + stat, mask=q_ok, other=0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BK, BQ]
            if GUARD:
                dst = tl.where(pair, pt_raw * (dpt - delta[None, :]), 0.0)
            else:
                dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
        u0, u1, u2 = advance(u0, u1, u2, nq1, nq2)
    return dk, dv


@triton.jit
def _na_bwd_dkdv_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, DK, DV,  # dk/dv: [B, L0, L1, L2, H, D] with the strides of sgb..sgd
    sqb, sq0, sq1, sq2, sqh, sqd,
    skb, sk0, sk1, sk2, skh, skd,
    svb, sv0, sv1, sv2, svh, svd,
    sdb, sd0, sd1, sd2, sdh, sdd,
    sgb, sg0, sg1, sg2, sgh, sgd,
    B, L0, L1, L2, DIL0, DIL1, DIL2, H, HEAD_DIM, scale,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    HAS_RPB: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
):
    # Rows of this program are keys (a TK tile); the inner loop walks query sub-tiles (TQ).
    BK: tl.constexpr = TK0 * TK1 * TK2
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    RH: tl.constexpr = (2 * K0 - 1) * R1 * R2
    pid, b = program_batch(TK0, TK1, TK2, L0, L1, L2, DIL0, DIL1, DIL2)
    h = tl.program_id(1).to(tl.int64)
    g0, g1, g2, lg0, lg1, lg2, first0, first1, first2 = tile_origin(
        pid, L0, L1, L2, DIL0, DIL1, DIL2, TK0, TK1, TK2
    )
    r0, r1, r2 = box_coords(tl.arange(0, BK), TK0, TK1, TK2)
    j0, j1, j2 = first0 + r0, first1 + r1, first2 + r2  # [BK] in-group key indices
    k_ok = (j0 < lg0) & (j1 < lg1) & (j2 < lg2)

    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    row_mask = k_ok[:, None] if EVEN_D else k_ok[:, None] & d_ok[None, :]
    k = tl.load(tile_ptrs(K, g0, g1, g2, first0, first1, first2, r0, r1, r2, b, h, skb, sk0, sk1, sk2, skh, skd,
                          dims, DIL0, DIL1, DIL2, WIDE), mask=row_mask, other=0.0)
    v = tl.load(tile_ptrs(V, g0, g1, g2, first0, first1, first2, r0, r1, r2, b, h, svb, sv0, sv1, sv2, svh, svd,
                          dims, DIL0, DIL1, DIL2, WIDE), mask=row_mask, other=0.0)
    k = dot_operand(k, UPCAST)
    v = dot_operand(v, UPCAST)
    krow = ((K0 - 1 + j0) * R1 + (K1 - 1 + j1)) * R2 + (K2 - 1 + j2)  # rpb row term of each key

    # Inverse-neighbourhood box: qs/qe are non-decreasing in j.
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

    q_base = Q + tile_base(g0, g1, g2, box0, box1, box2, b, h, sqb, sq0, sq1, sq2, sqh, DIL0, DIL1, DIL2)
    do_base = DO + tile_base(g0, g1, g2, box0, box1, box2, b, h, sdb, sd0, sd1, sd2, sdh, DIL0, DIL1, DIL2)
    # Strides of the [B, L0, L1, L2, H] statistics, in int64 from the first product (L0 * L1 * L2 * H may pass 2**31).
    st2 = h * 0 + H
    st1 = st2 * L2
    st0 = st1 * L1
    stat0 = tile_base(g0, g1, g2, box0, box1, box2, b, h, st0 * L0, st0, st1, st2, 1, DIL0, DIL1, DIL2)
    rpb_base = RPB + h * RH
    dk = tl.zeros([BK, BLOCK_D], tl.float32)
    dv = tl.zeros([BK, BLOCK_D], tl.float32)
    dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, LSE + stat0, DELTA + stat0, rpb_base, nq0 * nq1 * nq2,
                        nq1, nq2, box0, box1, box2, end0, end1, end2, lg0, lg1, lg2, j0, j1, j2, krow, dims, d_ok,
                        sq0, sq1, sq2, sqd, sd0, sd1, sd2, sdd, st0, st1, st2, DIL0, DIL1, DIL2, scale,
                        K0, K1, K2, S0, S1, S2, C0, C1, C2, HAS_RPB, COMPUTE_DK, COMPUTE_DV, EVEN_D, WIDE, PRECISION,
                        # Triton: a tl.constexpr parameter or constant takes a plain Python value
                        UPCAST, False, TQ0, TQ1, TQ2)  # type: ignore[arg-type]
    if COMPUTE_DK:  # noqa: SIM102 - a constexpr test around a run-time one
        if tl.max(tl.where(k_ok & ~finite_rows(dk), 1, 0)) > 0:
            dk, _rerun_dv = _dkdv_loop(
                tl.zeros([BK, BLOCK_D], tl.float32), dv, k, v, q_base, do_base, LSE + stat0, DELTA + stat0, rpb_base,
                nq0 * nq1 * nq2, nq1, nq2, box0, box1, box2, end0, end1, end2, lg0, lg1, lg2, j0, j1, j2, krow,
                dims, d_ok, sq0, sq1, sq2, sqd, sd0, sd1, sd2, sdd, st0, st1, st2, DIL0, DIL1, DIL2, scale,
                # Triton: a tl.constexpr parameter takes a plain Python value
                K0, K1, K2, S0, S1, S2, C0, C1, C2, HAS_RPB, True, False, EVEN_D, WIDE, PRECISION, UPCAST, True,  # type: ignore[arg-type]
                TQ0, TQ1, TQ2)
    if COMPUTE_DK:
        tl.store(tile_ptrs(DK, g0, g1, g2, first0, first1, first2, r0, r1, r2, b, h, sgb, sg0, sg1, sg2, sgh, sgd,
                           dims, DIL0, DIL1, DIL2, WIDE), (dk * scale).to(DK.dtype.element_ty), mask=row_mask)
    if COMPUTE_DV:
        tl.store(tile_ptrs(DV, g0, g1, g2, first0, first1, first2, r0, r1, r2, b, h, sgb, sg0, sg1, sg2, sgh, sgd,
                           dims, DIL0, DIL1, DIL2, WIDE), dv.to(DV.dtype.element_ty), mask=row_mask)


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
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launches the backward kernels for the gradients in `needs`.

    Args:
        grad_out: ``dO`` ``[B, *S, H, D]``, any strides.
        grad_lse: ``dLSE`` ``[B, *S, H]`` or None.
        out: The forward output (any strides).
        lse: The forward natural-log ``lse`` ``[B, *S, H]`` float32.
        deterministic: Reduce d_rpb without atomics.
        needs: Whether ``query``, ``key``, ``value`` and ``rpb`` need a gradient (rpb's is ignored without rpb).

    Returns:
        ``dq, dk, dv`` (contiguous, dtype of `query`) and ``d_rpb`` in ``rpb.dtype``; None where not needed.
    """
    geo, n = Geometry.of(problem), problem.n
    need_dq, need_dk, need_dv, need_drpb = needs
    need_drpb = need_drpb and rpb is not None
    device = query.device
    lse = lse.contiguous()
    grad_lse = grad_lse.contiguous() if grad_lse is not None else None
    dq = torch.empty(query.shape, dtype=query.dtype, device=device) if need_dq else None
    dk = torch.empty(query.shape, dtype=query.dtype, device=device) if need_dk else None
    dv = torch.empty(query.shape, dtype=query.dtype, device=device) if need_dv else None
    delta = torch.empty(lse.shape, dtype=torch.float32, device=device) if need_dk or need_dv else lse
    rpb_c = rpb.contiguous() if rpb is not None else lse  # dummy pointer when absent (never read)
    grads = next((t for t in (dq, dk, dv) if t is not None), query)  # output strides (all contiguous)
    kr = [2 * k - 1 for k in geo.kernel_size]
    table_size = kr[0] * kr[1] * kr[2]
    pads = {f"R{a}P": triton.next_power_of_2(kr[a]) if a < n else 1 for a in range(3)}
    mode = autotune_mode()
    tensors = [t for t in (query, key, value, out, grad_out, dq, dk, dv) if t is not None]
    common = dict(B=problem.batch, **geo.sizes(), H=problem.heads, HEAD_DIM=problem.head_dim, scale=problem.scale,
                  **geo.constexprs(), HAS_RPB=rpb is not None, BLOCK_D=head_block(problem.head_dim),
                  EVEN_D=head_block(problem.head_dim) == problem.head_dim, WIDE=not narrow_offsets(*tensors),
                  PRECISION=dot_precision(query.dtype), UPCAST=upcast_operands(query.dtype))

    def grid_q(meta):
        return launch_grid(geo, (meta["TQ0"], meta["TQ1"], meta["TQ2"]), problem.batch, problem.heads)

    def grid_k(meta):
        return launch_grid(geo, (meta["TK0"], meta["TK1"], meta["TK2"]), problem.batch, problem.heads)

    # d_rpb partial tables: one row per program (deterministic; rows past the chosen config's grid stay zero), or
    # copies that the programs' atomic adds are spread over.
    if need_drpb and deterministic:
        rows = problem.batch * max_tiles(geo, n, mode, problem.head_dim)
        table = torch.zeros((rows, problem.heads, table_size), dtype=torch.float32,
                            device=device)
    elif need_drpb:
        table = torch.zeros((ATOMIC_COPIES, problem.heads, table_size), dtype=torch.float32, device=device)
    else:
        table = lse  # dummy pointer (never written)
    dq_kernel = tuned(_na_bwd_dq_kernel, "dq", n, mode, problem.head_dim, ("TABLE",) if need_drpb else ())
    with launching("backward dQ", "dq", problem, mode):
        dq_kernel[grid_q](
            query, key, value, rpb_c, out, grad_out, lse, grad_lse if grad_lse is not None else lse, delta,
            dq if dq is not None else grads, table,
            *strides6(query, n), *strides6(key, n), *strides6(value, n), *strides6(out, n), *strides6(grad_out, n),
            *strides6(grads, n), **common,
            HAS_DLSE=grad_lse is not None, STORE_DELTA=need_dk or need_dv, COMPUTE_DQ=need_dq, COMPUTE_DRPB=need_drpb,
            DETERMINISTIC=deterministic, COPIES=ATOMIC_COPIES, RANK=n, **pads,
            RPB_PRECISION="tf32x3" if common["PRECISION"] == "ieee" else "tf32",
        )
    if need_dk or need_dv:
        dkdv_kernel = tuned(_na_bwd_dkdv_kernel, "dkdv", n, mode, problem.head_dim)
        with launching("backward dK/dV", "dkdv", problem, mode):
            dkdv_kernel[grid_k](
                query, key, value, rpb_c, grad_out, lse, delta, dk if dk is not None else grads,
                dv if dv is not None else grads,
                *strides6(query, n), *strides6(key, n), *strides6(value, n), *strides6(grad_out, n),
                *strides6(grads, n), **common, COMPUTE_DK=need_dk, COMPUTE_DV=need_dv,
            )
    d_rpb = table.sum(0).view(rpb.shape).to(rpb.dtype) if need_drpb and rpb is not None else None
    return dq, dk, dv, d_rpb


def max_tiles(geo: Geometry, n: int, mode: str, head_dim: int) -> int:
    """The largest dQ grid (query tiles) over the search space: rows of the deterministic partial-table buffer."""
    return max(geo.num_tiles(entry[0]) for entry in config_entries("dq", n, mode, head_dim))
