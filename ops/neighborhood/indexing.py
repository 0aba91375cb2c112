"""Window arithmetic of neighborhood attention (spec section 2) and cached gather tables for the reference path.

Everything here works on one axis at a time, on in-group indices of a dilation group; the multi-axis neighbourhood
is the Cartesian product of the per-axis ones.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch


def group_length(length: int, dilation: int, group: int) -> int:
    """Length of dilation group `group` on an axis of `length` tokens: ``ceil((length - group) / dilation)``."""
    return (length - group + dilation - 1) // dilation


def window(i: int, group_len: int, kernel: int, stride: int, causal: bool) -> Tuple[int, int]:
    """In-group key range ``[start, end)`` attended by in-group query `i`."""
    if causal:
        leader = min((i // stride) * stride + stride - 1, group_len - 1)
        return max(leader - kernel + 1, 0), i + 1
    left = kernel // 2
    leader = min((i // stride) * stride + stride // 2, group_len - 1)
    start = min(max(leader - left, 0), group_len - kernel)
    return start, start + kernel


def inverse_window(j: int, group_len: int, kernel: int, stride: int, causal: bool) -> Tuple[int, int]:
    """In-group query range ``[qs, qe)`` of the queries that attend to in-group key `j` (spec section 2.6)."""
    if causal:
        qe = stride * ((j + kernel) // stride + (1 if j + kernel >= group_len else 0))
        return j, min(qe, group_len)
    left = kernel // 2
    right = kernel - 1 - left
    off = stride - stride // 2 - 1
    qs = 0 if j < kernel else ((j - right + off) // stride) * stride
    qe = group_len if j >= group_len - kernel else ((j + left + off + 1) // stride) * stride
    return qs, qe


def axis_table(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> Tuple[list, list, list]:
    """Per-query neighbour table of one axis.

    Returns:
        Three `length x kernel` nested lists: the global key coordinate of each window slot, whether the slot is
        used (causal windows near the start hold fewer than `kernel` keys; unused slots point at the query itself),
        and the RPB index ``(kernel - 1) + (j - i)`` of the slot.
    """
    keys, valid, bias = [], [], []
    for x in range(length):
        g, i = x % dilation, x // dilation
        start, end = window(i, group_length(length, dilation, g), kernel, stride, causal)
        row_k, row_v, row_b = [], [], []
        for m in range(kernel):
            j = start + m
            used = j < end
            row_k.append(g + dilation * j if used else x)
            row_v.append(used)
            row_b.append((kernel - 1) + (j - i) if used else kernel - 1)
        keys.append(row_k)
        valid.append(row_v)
        bias.append(row_b)
    return keys, valid, bias


@lru_cache(maxsize=256)
def _tables_cpu(
    spatial: Tuple[int, ...],
    kernel_size: Tuple[int, ...],
    stride: Tuple[int, ...],
    dilation: Tuple[int, ...],
    is_causal: Tuple[bool, ...],
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    idx = torch.zeros((1, 1), dtype=torch.long)
    valid = torch.ones((1, 1), dtype=torch.bool)
    ridx = torch.zeros((1, 1), dtype=torch.long)
    for length, k, s, d, c in zip(spatial, kernel_size, stride, dilation, is_causal):
        keys, used, bias = (torch.tensor(t) for t in axis_table(length, k, s, d, c))
        # Row-major flattening: [N_prev, K_prev] x [L, k] -> [N_prev * L, K_prev * k].
        idx = (idx[:, None, :, None] * length + keys[None, :, None, :]).flatten(2).flatten(0, 1)
        valid = (valid[:, None, :, None] & used[None, :, None, :]).flatten(2).flatten(0, 1)
        ridx = (ridx[:, None, :, None] * (2 * k - 1) + bias[None, :, None, :]).flatten(2).flatten(0, 1)
    return idx.contiguous(), (None if bool(valid.all()) else valid.contiguous()), ridx.contiguous()


@lru_cache(maxsize=256)
def _tables_on(
    spatial: Tuple[int, ...],
    kernel_size: Tuple[int, ...],
    stride: Tuple[int, ...],
    dilation: Tuple[int, ...],
    is_causal: Tuple[bool, ...],
    device: torch.device,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    idx, valid, ridx = _tables_cpu(spatial, kernel_size, stride, dilation, is_causal)
    return idx.to(device), (None if valid is None else valid.to(device)), ridx.to(device)


def neighborhood_tables(
    spatial: Tuple[int, ...],
    kernel_size: Tuple[int, ...],
    stride: Tuple[int, ...],
    dilation: Tuple[int, ...],
    is_causal: Tuple[bool, ...],
    device: torch.device,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Cached gather tables over all `N` tokens and `K = prod(kernel_size)` window slots.

    Returns:
        ``idx [N, K]`` flat key index per query and slot; ``valid [N, K]`` slot mask, or None when every slot is
        used (always the case without causal axes); ``ridx [N, K]`` flat index into ``rpb[h].flatten()``.
    """
    return _tables_on(spatial, kernel_size, stride, dilation, is_causal, torch.device(device))

