"""Dense float64 ground truth for neighborhood attention, written from the window rules of docs/ops.md only.

It builds the full ``N x N`` boolean mask pair by pair in plain Python (no code shared with ``ops``), so it is slow
and meant for tiny problems.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch


def _tuple(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def axis_allowed(x: int, y: int, length: int, k: int, s: int, d: int, causal: bool) -> bool:
    """Whether query `x` attends to key `y` on one axis, from the documented formulas as written."""
    if x % d != y % d:
        return False
    g, i, j = x % d, x // d, y // d
    group_len = math.ceil((length - g) / d)
    if causal:
        leader = min((i // s) * s + s - 1, group_len - 1)
        start, end = max(leader - k + 1, 0), i + 1
    else:
        left = k // 2
        leader = min((i // s) * s + s // 2, group_len - 1)
        start = min(max(leader - left, 0), group_len - k)
        end = start + k
    return start <= j < end


def dense_mask_and_bias_index(
    spatial: Sequence[int], kernel_size, stride, dilation, is_causal
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``mask [N, N]`` (bool) and ``bias_index [N, N, n]`` (rpb index per axis, -1 where disallowed)."""
    n = len(spatial)
    ks, st, dil, causal = (_tuple(a, n) for a in (kernel_size, stride, dilation, is_causal))
    coords = list(itertools.product(*(range(length) for length in spatial)))
    size = len(coords)
    mask = torch.zeros(size, size, dtype=torch.bool)
    index = torch.full((size, size, n), -1, dtype=torch.long)
    for a, x in enumerate(coords):
        for b, y in enumerate(coords):
            if all(
                axis_allowed(x[ax], y[ax], spatial[ax], ks[ax], st[ax], dil[ax], causal[ax]) for ax in range(n)
            ):
                mask[a, b] = True
                for ax in range(n):
                    index[a, b, ax] = (ks[ax] - 1) + (y[ax] - x[ax]) // dil[ax]
    return mask, index


def dense_na(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale: float | None = None,
    rpb: torch.Tensor | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked-softmax attention in float64 (differentiable).

    Args:
        query: ``[B, *S, H, D]`` in any dtype; upcast to float64.
        key: ``[B, *S, H_kv, D]``; query head ``h`` uses key/value head ``h * H_kv // H`` (GQA/MQA).
        additional_keys: ``[B, E, H_kv, D]`` keys visible to every query (no bias), or None.
        additional_values: ``[B, E, H_kv, D]``.

    Returns:
        ``out [B, *S, H, D]`` and ``lse [B, *S, H]``, both float64.
    """
    batch, *spatial, heads, head_dim = query.shape
    n = len(spatial)
    tokens = math.prod(spatial)
    mask, index = dense_mask_and_bias_index(spatial, kernel_size, stride, dilation, is_causal)
    # Key/value head of each query head, spelled out as a table (not repeat_interleave).
    kv_head = torch.tensor([h * key.shape[-2] // heads for h in range(heads)])
    q = query.double().reshape(batch, tokens, heads, head_dim).transpose(1, 2)
    k = key.double().reshape(batch, tokens, -1, head_dim)[:, :, kv_head].transpose(1, 2)
    v = value.double().reshape(batch, tokens, -1, head_dim)[:, :, kv_head].transpose(1, 2)
    scale = head_dim**-0.5 if scale is None else scale
    logits = scale * (q @ k.transpose(-1, -2))  # [B, H, N, N]
    if rpb is not None:
        safe = index.clamp(min=0)
        bias = rpb.double()[(slice(None), *(safe[..., ax] for ax in range(n)))]  # [H, N, N]
        logits = logits + torch.where(mask, bias, torch.zeros((), dtype=torch.float64))
    logits = logits.masked_fill(~mask, -math.inf)
    if additional_keys is not None:
        # Extra tokens appended as more key columns, unmasked and unbiased: [B, H, N, N + E].
        ek = additional_keys.double()[:, :, kv_head].transpose(1, 2)  # [B, H, E, D]
        ev = additional_values.double()[:, :, kv_head].transpose(1, 2)
        logits = torch.cat([logits, scale * (q @ ek.transpose(-1, -2))], dim=-1)
        v = torch.cat([v, ev], dim=2)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.softmax(logits, dim=-1) @ v
    out = out.transpose(1, 2).reshape(batch, *spatial, heads, head_dim)
    return out, lse.transpose(1, 2).reshape(batch, *spatial, heads)


def case_id(spatial, kernel_size, stride, dilation, is_causal, rpb: bool) -> str:
    """Readable id like ``n2-L13x9-k4x3-s2x1-d2x3-c10-rpb``."""
    n = len(spatial)
    parts = [f"n{n}", "L" + "x".join(map(str, spatial))]
    for tag, value in (("k", kernel_size), ("s", stride), ("d", dilation)):
        parts.append(tag + "x".join(map(str, _tuple(value, n))))
    parts.append("c" + "".join(str(int(c)) for c in _tuple(is_causal, n)))
    if rpb:
        parts.append("rpb")
    return "-".join(parts)


def window_logits(
    query: torch.Tensor, key: torch.Tensor, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None
) -> list[list[list[list[float]]]]:
    """Unscaled logits ``<q, k> + bias`` of each query's allowed keys, in increasing flat key index.

    Returns:
        ``result[b][x][h]``: the list of logits of query token ``x`` (flat, row-major), head ``h``.
    """
    batch, *spatial, heads, head_dim = query.shape
    n = len(spatial)
    tokens = math.prod(spatial)
    mask, index = dense_mask_and_bias_index(spatial, kernel_size, stride, dilation, is_causal)
    q = query.double().reshape(batch, tokens, heads, head_dim)
    k = key.double().reshape(batch, tokens, -1, head_dim)
    result = []
    for b in range(batch):
        per_query = []
        for x in range(tokens):
            per_head = []
            for h in range(heads):
                row = []
                for y in range(tokens):
                    if mask[x, y]:
                        value = float(q[b, x, h] @ k[b, y, h * k.shape[2] // heads])
                        if rpb is not None:
                            value += float(rpb.double()[(h, *(int(index[x, y, ax]) for ax in range(n)))])
                        row.append(value)
                per_head.append(row)
            per_query.append(per_head)
        result.append(per_query)
    return result
