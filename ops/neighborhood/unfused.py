"""Unfused neighborhood attention: ``na{1,2,3}d_qk`` (logits) and ``na{1,2,3}d_av`` (weighted sum of values).

The two halves of the fused op, for code that wants to see or change the attention weights (NATTEN's unfused ops,
removed there in 0.20). Same window semantics, arguments and heads-last layout as ``na1d/na2d/na3d``:

* ``qk(query, key)`` returns ``[B, *S, heads, prod(kernel_size)]``: slot ``m`` is the ``m``-th key of the query's
  window in row-major order over the axes (on each axis the window's keys from ``start`` upwards). A causal window
  can hold fewer than ``k`` keys on an axis; its unused slots hold ``-inf`` (weight 0 after a softmax).
  No scale is applied (scale the query first, as NATTEN's modules did); ``rpb`` is added as in the fused op.
  With ``additional_keys`` the logits of those keys follow as ``n_extra`` more slots (no rpb).
* ``av(attn, value)`` returns ``sum over slots of attn * value`` ``[B, *S, heads, head_dim]``; unused causal slots
  are ignored whatever they hold.

``softmax(qk(scale * q, k, rpb=rpb))`` then ``av`` equals the fused op (tests/test_ops_unfused.py). Everything is
plain PyTorch (gathers and products, autograd for every gradient, second order included), so it runs on every device
and dtype; it materialises ``O(N * prod(k) * head_dim)`` gathered keys and values, the price of visible weights.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .indexing import group_length, window
from .reference import accumulation_dtype
from .validation import SUPPORTED_DTYPES, BoolOrTuple, IntOrTuple, check_window

__all__ = ["na1d_av", "na1d_qk", "na2d_av", "na2d_qk", "na3d_av", "na3d_qk", "neighborhood_tables"]


def _axis_table(
    length: int, k: int, s: int, d: int, causal: bool
) -> tuple[list[list[int]], list[list[bool]], list[list[int]]]:
    """Per position of one axis: ``keys [L, k]`` (key coordinate of each slot; the query's own where unused),
    ``valid [L, k]`` and ``bias [L, k]`` (rpb index ``(k - 1) + (j - i)``, ``k - 1`` where unused)."""
    keys: list[list[int]] = []
    valid: list[list[bool]] = []
    bias: list[list[int]] = []
    for x in range(length):
        g, i = x % d, x // d
        start, end = window(i, group_length(length, d, g), k, s, causal)
        slots = [start + m for m in range(k)]
        valid.append([j < end for j in slots])
        keys.append([g + d * j if j < end else x for j in slots])
        bias.append([(k - 1) + (j - i) if j < end else k - 1 for j in slots])
    return keys, valid, bias


@lru_cache(maxsize=128)
def _tables_cpu(spatial, kernel_size, stride, dilation, is_causal) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Explicit CPU: a caller inside `with torch.device("meta")` must not leave meta tables in the cache.
    keys = torch.zeros((1, 1), dtype=torch.long, device="cpu")
    valid = torch.ones((1, 1), dtype=torch.bool, device="cpu")
    bias = torch.zeros((1, 1), dtype=torch.long, device="cpu")
    for length, k, s, d, c in zip(spatial, kernel_size, stride, dilation, is_causal):
        ka, va, ba = (torch.tensor(t, device="cpu") for t in _axis_table(length, k, s, d, c))
        # Row-major product over the axes: [N_prev, K_prev] x [L, k] -> [N_prev * L, K_prev * k].
        keys = (keys[:, None, :, None] * length + ka[None, :, None, :]).flatten(2).flatten(0, 1)
        valid = (valid[:, None, :, None] & va[None, :, None, :]).flatten(2).flatten(0, 1)
        bias = (bias[:, None, :, None] * (2 * k - 1) + ba[None, :, None, :]).flatten(2).flatten(0, 1)
    return keys.contiguous(), valid.contiguous(), bias.contiguous()


@lru_cache(maxsize=128)
def _tables_on(spatial, kernel_size, stride, dilation, is_causal, device):
    # Cached tables outlive the call: never inference or fake tensors (see indexing.tile_tables).
    with torch.inference_mode(False), unset_fake_temporarily():
        return tuple(t.to(device) for t in _tables_cpu(spatial, kernel_size, stride, dilation, is_causal))


def neighborhood_tables(
    spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each query's window as slots, the layout of the unfused ops' last axis (cached).

    Returns:
        ``keys [N, K]`` flat (row-major) key index of each slot (the query's own index in unused slots),
        ``valid [N, K]`` whether the slot holds a key of the window, and ``bias [N, K]`` the flat index into
        ``rpb[h].flatten()``; ``N = prod(spatial)``, ``K = prod(kernel_size)``.
    """
    return _tables_on(tuple(spatial), tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal),
                      torch.device(device))


def _check_tensor(fn: str, name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{fn}: {name} dtype={t.dtype} is not supported; supported dtypes are float16, bfloat16, "
                         "float32, float64")


def _check_pair(fn: str, n: int, first: str, a: torch.Tensor, second: str, b: torch.Tensor, last_equal: bool) -> None:
    """`a` ``[B, *S, H, X]`` and `b` ``[B, *S, H_kv, D]``: one dtype and device, same batch and spatial sizes, H_kv
    dividing H (and ``X == D`` when `last_equal`)."""
    _check_tensor(fn, first, a)
    _check_tensor(fn, second, b)
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{fn}: {first} and {second} must share one dtype and device, got {first} dtype={a.dtype} "
                         f"device={a.device}, {second} dtype={b.dtype} device={b.device}")
    for name, t in ((first, a), (second, b)):
        if t.dim() != n + 3:
            raise ValueError(f"{fn}: {name} must have the layout [B, *spatial({n}), heads, last] ({n + 3} dims), got "
                             f"{name}.shape={tuple(t.shape)}")
    shapes = f"{first}.shape={tuple(a.shape)}, {second}.shape={tuple(b.shape)}"
    if a.shape[:-2] != b.shape[:-2] or (last_equal and a.shape[-1] != b.shape[-1]):
        what = "batch, spatial sizes and head_dim" if last_equal else "batch and spatial sizes"
        raise ValueError(f"{fn}: {first} and {second} must have the same {what}, got {shapes}")
    if 0 in a.shape[1:] or 0 in b.shape[1:]:
        raise ValueError(f"{fn}: heads, head_dim and every spatial length must be non-zero, got {shapes}")
    if a.shape[-2] % b.shape[-2] != 0:
        raise ValueError(f"{fn}: the heads of {second} must divide the heads of {first} (GQA/MQA), got "
                         f"{a.shape[-2]} and {b.shape[-2]} heads ({shapes})")


def _check_extra(fn: str, name: str, extra: Any, ref: torch.Tensor, heads_kv: int, head_dim: int) -> int:
    """`extra` ``[B, n_extra, heads_kv, head_dim]`` matching `ref` in dtype and device; returns ``n_extra``."""
    _check_tensor(fn, name, extra)
    if extra.dtype != ref.dtype or extra.device != ref.device:
        raise ValueError(f"{fn}: {name} must have the dtype and device of the other inputs ({ref.dtype}, "
                         f"{ref.device}), got dtype={extra.dtype}, device={extra.device}")
    expected = (ref.shape[0], "n_extra", heads_kv, head_dim)
    if extra.dim() != 4 or extra.shape[0] != ref.shape[0] or tuple(extra.shape[2:]) != (heads_kv, head_dim):
        raise ValueError(f"{fn}: {name} must have shape [B, n_extra, heads_kv, head_dim] = {expected}, got "
                         f"{name}.shape={tuple(extra.shape)}")
    return extra.shape[1]


def _qk(n, fn, query, key, kernel_size, stride, dilation, is_causal, rpb, additional_keys) -> torch.Tensor:
    _check_pair(fn, n, "query", query, "key", key, last_equal=True)
    batch, *spatial, heads, head_dim = query.shape
    heads_kv = key.shape[-2]
    ks, st, dil, causal = check_window(fn, n, spatial, kernel_size, stride, dilation, is_causal,
                                  f"query.shape={tuple(query.shape)}")
    if rpb is not None:
        if not isinstance(rpb, torch.Tensor) or rpb.dtype not in SUPPORTED_DTYPES or rpb.device != query.device:
            detail = (f"type {type(rpb).__name__}" if not isinstance(rpb, torch.Tensor)
                      else f"dtype={rpb.dtype}, device={rpb.device}")
            raise ValueError(f"{fn}: rpb must be a floating tensor on the device of query ({query.device}), got "
                             f"{detail}")
        expected = (heads, *(2 * k - 1 for k in ks))
        if tuple(rpb.shape) != expected:
            raise ValueError(f"{fn}: rpb must have shape {expected} [heads, 2k-1, ...], got "
                             f"rpb.shape={tuple(rpb.shape)}")
        if any(s != 1 for s in st):
            raise ValueError(f"{fn}: rpb is only defined for stride 1 on every axis, got stride={st}")
    if additional_keys is not None:
        _check_extra(fn, "additional_keys", additional_keys, query, heads_kv, head_dim)
    acc = accumulation_dtype(query.dtype)
    tokens, groups = math.prod(spatial), heads // heads_kv
    keys, valid, bias = neighborhood_tables(tuple(spatial), ks, st, dil, causal, query.device)
    # Query heads h = kv_head * groups + g (repeat_interleave order, as torch's SDPA enable_gqa).
    q = query.reshape(batch, tokens, heads_kv, groups, head_dim).to(acc)
    k = key.reshape(batch, tokens, heads_kv, head_dim).to(acc)[:, keys]  # [B, N, K, H_kv, D]
    logits = torch.einsum("bnhgd,bnkhd->bnhgk", q, k).reshape(batch, tokens, heads, -1)  # [B, N, H, K]
    if rpb is not None:
        table = rpb.to(acc).reshape(heads, -1)[:, bias]  # [H, N, K]
        logits = logits + table.permute(1, 0, 2)
    logits = logits.masked_fill(~valid[:, None, :], -math.inf)
    if additional_keys is not None:
        extra = torch.einsum("bnhgd,behd->bnhge", q, additional_keys.to(acc)).reshape(batch, tokens, heads, -1)
        logits = torch.cat([logits, extra], dim=-1)
    return logits.to(query.dtype).reshape(batch, *spatial, heads, logits.shape[-1])


def _av(n, fn, attn, value, kernel_size, stride, dilation, is_causal, additional_values) -> torch.Tensor:
    _check_pair(fn, n, "attn", attn, "value", value, last_equal=False)
    batch, *spatial, heads, width = attn.shape
    heads_kv, head_dim = value.shape[-2], value.shape[-1]
    ks, st, dil, causal = check_window(fn, n, spatial, kernel_size, stride, dilation, is_causal,
                                  f"attn.shape={tuple(attn.shape)}")
    slots = math.prod(ks)
    n_extra = 0
    if additional_values is not None:
        n_extra = _check_extra(fn, "additional_values", additional_values, value, heads_kv, head_dim)
    if width != slots + n_extra:
        raise ValueError(f"{fn}: attn's last axis must hold prod(kernel_size)={slots} neighborhood weights plus "
                         f"n_extra={n_extra} additional ones, got attn.shape={tuple(attn.shape)}")
    acc = accumulation_dtype(attn.dtype)
    tokens, groups = math.prod(spatial), heads // heads_kv
    keys, valid, _ = neighborhood_tables(tuple(spatial), ks, st, dil, causal, attn.device)
    w = attn.reshape(batch, tokens, heads_kv, groups, width).to(acc)
    # Unused causal slots contribute nothing, whatever the caller put there (-inf logits, or softmax zeros).
    w_nb = torch.where(valid[:, None, None, :], w[..., :slots], torch.zeros((), dtype=acc, device=attn.device))
    v = value.reshape(batch, tokens, heads_kv, head_dim).to(acc)[:, keys]  # [B, N, K, H_kv, D]
    out = torch.einsum("bnhgk,bnkhd->bnhgd", w_nb, v)
    if additional_values is not None:
        out = out + torch.einsum("bnhge,behd->bnhgd", w[..., slots:], additional_values.to(acc))
    return out.to(attn.dtype).reshape(batch, *spatial, heads, head_dim)


def na1d_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    rpb: torch.Tensor | None = None,
    additional_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """1-D neighborhood logits ``<query, key> + rpb`` over each query's window (no scale applied).

    Args:
        query: ``[B, L, H, D]``.
        key: ``[B, L, H_kv, D]`` with ``H_kv`` dividing ``H`` (query head ``h`` reads key head
            ``h // (H // H_kv)``).
        kernel_size: Window size ``k >= 2``.
        stride: Query-block stride, ``1 <= s <= k``.
        dilation: Dilation ``d >= 1`` with ``k * d <= L``.
        is_causal: Causal masking.
        rpb: Relative positional bias ``[H, 2k-1]`` (stride 1 only), added to the logits.
        additional_keys: ``[B, n_extra, H_kv, D]`` keys every query also scores (no rpb).

    Returns:
        ``[B, L, H, k (+ n_extra)]`` in `query`'s dtype; ``-inf`` in the unused slots of causal windows.
    """
    return _qk(1, "na1d_qk", query, key, kernel_size, stride, dilation, is_causal, rpb, additional_keys)


def na2d_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    rpb: torch.Tensor | None = None,
    additional_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """2-D neighborhood logits ``[B, X, Y, H, k_0 * k_1 (+ n_extra)]``; arguments as in :func:`na1d_qk`."""
    return _qk(2, "na2d_qk", query, key, kernel_size, stride, dilation, is_causal, rpb, additional_keys)


def na3d_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    rpb: torch.Tensor | None = None,
    additional_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """3-D neighborhood logits ``[B, X, Y, Z, H, k_0 * k_1 * k_2 (+ n_extra)]``; arguments as in
    :func:`na1d_qk`."""
    return _qk(3, "na3d_qk", query, key, kernel_size, stride, dilation, is_causal, rpb, additional_keys)


def na1d_av(
    attn: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    additional_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """1-D weighted sum of each query's window of values.

    Args:
        attn: Weights ``[B, L, H, k (+ n_extra)]`` in the slot order of :func:`na1d_qk`.
        value: ``[B, L, H_kv, D]`` with ``H_kv`` dividing ``H``.
        kernel_size: As given to :func:`na1d_qk`.
        stride: As given to :func:`na1d_qk`.
        dilation: As given to :func:`na1d_qk`.
        is_causal: As given to :func:`na1d_qk`.
        additional_values: ``[B, n_extra, H_kv, D]``, weighted by the last ``n_extra`` slots of `attn`.

    Returns:
        ``[B, L, H, D]`` in `attn`'s dtype.
    """
    return _av(1, "na1d_av", attn, value, kernel_size, stride, dilation, is_causal, additional_values)


def na2d_av(
    attn: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    additional_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """2-D weighted sum of each query's window of values; arguments as in :func:`na1d_av`."""
    return _av(2, "na2d_av", attn, value, kernel_size, stride, dilation, is_causal, additional_values)


def na3d_av(
    attn: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    additional_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """3-D weighted sum of each query's window of values; arguments as in :func:`na1d_av`."""
    return _av(3, "na3d_av", attn, value, kernel_size, stride, dilation, is_causal, additional_values)
