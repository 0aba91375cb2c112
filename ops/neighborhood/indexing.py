"""Window arithmetic of neighborhood attention (docs/ops.md, "Semantics") and cached gather tables for the reference.

Everything here works on one axis at a time, on in-group indices of a dilation group; the multi-axis neighbourhood
is the Cartesian product of the per-axis ones.

Under ``torch.export`` with a symbolic height or width (docs/export.md, "Dynamic resolution") the tables cannot be
built in Python: :func:`tile_tables` then computes them as tensor expressions of the symbolic lengths
(:func:`symbolic_window_tables`), with one query per tile, and :func:`default_tile` picks that tile.
"""

from __future__ import annotations

from functools import lru_cache
from typing import cast

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily


def group_length(length: int, dilation: int, group: int) -> int:
    """Length of dilation group `group` on an axis of `length` tokens: ``ceil((length - group) / dilation)``."""
    return (length - group + dilation - 1) // dilation


def window(i: int, group_len: int, kernel: int, stride: int, causal: bool) -> tuple[int, int]:
    """In-group key range ``[start, end)`` attended by in-group query `i`."""
    if causal:
        leader = min((i // stride) * stride + stride - 1, group_len - 1)
        return max(leader - kernel + 1, 0), i + 1
    left = kernel // 2
    leader = min((i // stride) * stride + stride // 2, group_len - 1)
    start = min(max(leader - left, 0), group_len - kernel)
    return start, start + kernel


def inverse_window(j: int, group_len: int, kernel: int, stride: int, causal: bool) -> tuple[int, int]:
    """In-group query range ``[qs, qe)`` of the queries that attend to in-group key `j`."""
    if causal:
        qe = stride * ((j + kernel) // stride + (1 if j + kernel >= group_len else 0))
        return j, min(qe, group_len)
    left = kernel // 2
    right = kernel - 1 - left
    off = stride - stride // 2 - 1
    qs = 0 if j < kernel else ((j - right + off) // stride) * stride
    qe = group_len if j >= group_len - kernel else ((j + left + off + 1) // stride) * stride
    return qs, qe


def default_tile(kernel_size: tuple[int, ...], dilation: tuple[int, ...], spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Query-tile extent per axis for the reference path.

    A tile of ``t`` queries visits ``t + k - 1`` keys per axis: larger tiles gather fewer keys per query but score
    more keys outside each window. One kernel width measured best on CPU for NAT shapes (training and inference),
    with a floor that keeps the products from getting tiny; an axis barely longer than the halo is taken whole.
    """
    if is_symbolic(spatial):
        # Tile sizes must be Python ints; the symbolic tables gather each query's own window.
        return (1,) * len(spatial)
    floor = {1: 16, 2: 4}.get(len(kernel_size), 3)
    tiles = []
    for k, d, length in zip(kernel_size, dilation, spatial):
        tile, group = max(k, floor), length // d
        tiles.append(group if group <= tile + k - 1 else tile)
    return tuple(tiles)


def axis_tiles(length: int, kernel: int, stride: int, dilation: int, causal: bool, tile: int):
    """Cuts one axis into query tiles of `tile` in-group queries, each with the halo of keys its queries need.

    Tiles never mix dilation groups. The last tile of a group is shifted back to stay full, so it can overlap the
    previous one; each query is owned by exactly one tile.

    Returns:
        ``queries [T_n, tile]`` and ``keys [T_n, halo]`` global coordinates, ``allowed [T_n, tile, halo]`` (key slot
        in the query's window), ``bias [T_n, tile, halo]`` RPB index (``k - 1`` where not allowed), and
        ``owner [length]`` giving ``tile_index * tile + slot`` of every query.
    """
    spans = []
    for g in range(dilation):
        glen = group_length(length, dilation, g)
        starts = list(range(0, glen - tile + 1, tile))
        if starts[-1] + tile < glen:
            starts.append(glen - tile)
        for t0 in starts:
            first, last = window(t0, glen, kernel, stride, causal), window(t0 + tile - 1, glen, kernel, stride, causal)
            spans.append((g, glen, t0, first[0], last[1]))
    halo = max(end - start for *_, start, end in spans)
    queries, keys, allowed, bias, owner = [], [], [], [], [0] * length
    for t, (g, glen, t0, kstart, _) in enumerate(spans):
        kstart = max(min(kstart, glen - halo), 0)
        queries.append([g + dilation * (t0 + u) for u in range(tile)])
        # Slots past the group's end exist only when the group is shorter than the halo; they are never allowed.
        keys.append([g + dilation * min(kstart + m, glen - 1) for m in range(halo)])
        rows_a, rows_b = [], []
        for u in range(tile):
            i = t0 + u
            owner[g + dilation * i] = t * tile + u
            start, end = window(i, glen, kernel, stride, causal)
            row_a = [start <= kstart + m < end for m in range(halo)]
            rows_a.append(row_a)
            rows_b.append([(kernel - 1) + (kstart + m - i) if ok else kernel - 1 for m, ok in enumerate(row_a)])
        allowed.append(rows_a)
        bias.append(rows_b)
    return queries, keys, allowed, bias, owner


@lru_cache(maxsize=256)
def _tile_tables_cpu(
    spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    tile: tuple[int, ...],
) -> tuple[torch.Tensor, ...]:
    # Explicit CPU: a caller inside `with torch.device("meta")` must not leave meta tables in the cache.
    q_idx = torch.zeros((1, 1), dtype=torch.long, device="cpu")
    k_idx = torch.zeros((1, 1), dtype=torch.long, device="cpu")
    allowed = torch.ones((1, 1, 1), dtype=torch.bool, device="cpu")
    ridx = torch.zeros((1, 1, 1), dtype=torch.long, device="cpu")
    owner = torch.zeros((1,), dtype=torch.long, device="cpu")
    tiles_so_far, tile_so_far = 1, 1
    for length, k, s, d, c, t in zip(spatial, kernel_size, stride, dilation, is_causal, tile):
        qa, ka, aa, ba, oa = (torch.tensor(x, device="cpu") for x in axis_tiles(length, k, s, d, c, t))
        # Row-major product of tiles, of query slots and of key slots: [n_prev, P] x [n_a, p] -> [n_prev * n_a, P * p].
        q_idx = (q_idx[:, None, :, None] * length + qa[None, :, None, :]).flatten(2).flatten(0, 1)
        k_idx = (k_idx[:, None, :, None] * length + ka[None, :, None, :]).flatten(2).flatten(0, 1)
        allowed = allowed[:, None, :, None, :, None] & aa[None, :, None, :, None, :]
        allowed = allowed.flatten(4, 5).flatten(2, 3).flatten(0, 1)
        ridx = ridx[:, None, :, None, :, None] * (2 * k - 1) + ba[None, :, None, :, None, :]
        ridx = ridx.flatten(4, 5).flatten(2, 3).flatten(0, 1)
        # owner = tile * T + slot, with tile and slot both row-major over the axes seen so far.
        prev_tile, prev_slot = owner // tile_so_far, owner % tile_so_far
        cur_tile, cur_slot = oa // t, oa % t
        n_tiles_a = qa.shape[0]
        tile_flat = prev_tile[:, None] * n_tiles_a + cur_tile[None, :]
        slot_flat = prev_slot[:, None] * t + cur_slot[None, :]
        tiles_so_far, tile_so_far = tiles_so_far * n_tiles_a, tile_so_far * t
        owner = (tile_flat * tile_so_far + slot_flat).flatten()
    return q_idx.contiguous(), k_idx.contiguous(), allowed.contiguous(), ridx.contiguous(), owner.contiguous()


@lru_cache(maxsize=256)
def _tile_tables_on(spatial, kernel_size, stride, dilation, is_causal, tile, device):
    # Cached tables outlive the call: built under inference mode they would be inference tensors, which autograd
    # refuses to save later (a validation pass before training would poison the cache).
    # Under torch.export / the ONNX exporter a fake-tensor mode is active: tables built there would be fake and,
    # cached, would turn every later eager call into fake tensors. Real tables enter an exported graph as constants.
    with torch.inference_mode(False), unset_fake_temporarily():
        cpu = _tile_tables_cpu(spatial, kernel_size, stride, dilation, is_causal, tile)
        return tuple(t.to(device) for t in cpu)


def tile_tables(
    spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    tile: tuple[int, ...],
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """Cached tile tables over all tokens: the multi-axis product of :func:`axis_tiles`.

    Returns:
        ``q_idx [T_n, T]`` and ``k_idx [T_n, halo]`` flat token indices per tile, ``allowed [T_n, T, halo]``,
        ``ridx [T_n, T, halo]`` flat index into ``rpb[h].flatten()``, and ``owner [N]`` flat index into the
        ``T_n * T`` tile slots holding each query's result.
    """
    if is_symbolic(spatial):
        return symbolic_window_tables(spatial, kernel_size, stride, dilation, is_causal, tile, torch.device(device))
    return _tile_tables_on(spatial, kernel_size, stride, dilation, is_causal, tile, torch.device(device))


def is_symbolic(spatial: tuple[object, ...]) -> bool:
    """True when a length is a symbolic size (``torch.export`` with a dynamic height or width), not a Python int."""
    return any(not isinstance(length, int) for length in spatial)


def symbolic_axis_windows(
    length: torch.SymInt | int, kernel: int, stride: int, dilation: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query key coordinates and bias offsets on one non-causal axis, as tensor expressions of `length`.

    The same windows as :func:`window`: for token ``x``, group ``g = x % d``, in-group query ``i = x // d``, group
    length ``glen = ceil((L - g) / d)``, ``leader = min((i // s) * s + s // 2, glen - 1)`` and
    ``start = max(min(leader - k // 2, glen - k), 0)``. Where a group is shorter than the kernel (a map below the
    exported range) the last key slots point past the axis, so the gather fails instead of reading wrapped keys.

    Returns:
        ``keys [L, k]`` global key coordinate of each window slot and ``bias [L, k]`` its RPB offset
        ``k - 1 + key - query`` (in-group), in ``[0, 2k - 2]``.
    """
    # [L] global coordinate of each query; `length` may be a SymInt (torch.export), which arange takes at run time
    # (the cast only tells torch 2.11's stubs, which type arange's end as a plain number)
    x = torch.arange(cast(int, length), device=device)
    group, i = x % dilation, x // dilation
    glen = (group.neg() + length + dilation - 1) // dilation  # [L] length of each query's dilation group
    leader = torch.minimum((i // stride) * stride + stride // 2, glen - 1)
    start = torch.clamp(torch.minimum(leader - kernel // 2, glen - kernel), min=0)
    slots = start[:, None] + torch.arange(kernel, device=device)  # [L, k] in-group key of each slot
    return group[:, None] + dilation * slots, kernel - 1 + slots - i[:, None]


def symbolic_window_tables(
    spatial: tuple[torch.SymInt | int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    tile: tuple[int, ...],
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """:func:`tile_tables` for symbolic lengths: one query per tile (``T = 1``) and its own window as the halo.

    Computed in the traced graph (``arange``, floor division, ``minimum``/``clamp``, broadcasting), so an exported
    program or ONNX file gets the tables of whatever height and width it runs at.

    Raises:
        ValueError: A causal axis or a tile other than 1 (not supported on this path).
    """
    if any(is_causal):
        raise ValueError(f"dynamic-shape export supports non-causal neighborhood attention only, got "
                         f"is_causal={is_causal}")
    if any(t != 1 for t in tile):
        raise ValueError(f"dynamic-shape export gathers one query per tile, got tile={tile}")
    keys = torch.zeros((), dtype=torch.long, device=device)
    bias = torch.zeros((), dtype=torch.long, device=device)
    for length, k, s, d in zip(spatial, kernel_size, stride, dilation):
        axis_keys, axis_bias = symbolic_axis_windows(length, k, s, d, device)
        # [..., L_a, k_a] appended: row-major flat key index and flat rpb index over the axes seen so far.
        keys = axis_keys + keys[..., None, None] * cast(int, length)
        bias = bias[..., None, None] * (2 * k - 1) + axis_bias
    n = len(spatial)
    # [L_0, k_0, L_1, k_1, ...] -> [L_0, L_1, ..., k_0, k_1, ...] -> [N, K]
    order = [2 * a for a in range(n)] + [2 * a + 1 for a in range(n)]
    window = 1
    for k in kernel_size:
        window *= k
    k_idx = keys.permute(order).reshape(-1, window)
    tokens = k_idx.shape[0]
    ridx = bias.permute(order).reshape(tokens, 1, window)
    q_idx = torch.arange(tokens, device=device)[:, None]  # [N, 1]
    allowed = torch.ones(1, 1, window, dtype=torch.bool, device=device).expand(tokens, 1, window)
    return q_idx, k_idx, allowed, ridx, q_idx.view(-1)
