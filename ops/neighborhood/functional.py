"""Functional neighborhood attention: ``na1d``, ``na2d``, ``na3d`` (NATTEN-compatible names and layout)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .dispatch import select_backend
from .reference import accumulation_dtype, na_reference
from .validation import BoolOrTuple, IntOrTuple, Problem, check_problem

Output = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _run(problem: Problem, query, key, value, rpb, return_lse: bool, backend: Optional[str]) -> Output:
    if problem.batch == 0:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        lse = torch.empty(query.shape[:-1], dtype=accumulation_dtype(query.dtype), device=query.device)
        return (out, lse) if return_lse else out
    if select_backend(problem, backend) == "triton":
        from .triton import na_triton

        out, lse = na_triton(problem, query, key, value, rpb)
    else:
        out, lse = na_reference(problem, query, key, value, rpb, need_lse=return_lse)
    return (out, lse) if return_lse else out


def _na(
    n: int,
    fn: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple,
    dilation: IntOrTuple,
    is_causal: BoolOrTuple,
    scale: Optional[float],
    rpb: Optional[torch.Tensor],
    return_lse: bool,
    backend: Optional[str],
) -> Output:
    problem = check_problem(fn, n, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, backend)
    return _run(problem, query, key, value, rpb, return_lse, backend)


def na1d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: Optional[float] = None,
    rpb: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Output:
    """1-D neighborhood attention over ``[B, L, heads, head_dim]`` tensors.

    Args:
        query: ``[B, L, H, D]``.
        key: Same shape, dtype and device as `query`.
        value: Same shape, dtype and device as `query`.
        kernel_size: Window size ``k >= 2``.
        stride: Query-block stride, ``1 <= s <= k``.
        dilation: Dilation ``d >= 1`` with ``k * d <= L``.
        is_causal: Causal masking.
        scale: Logit scale; None means ``D ** -0.5``.
        rpb: Relative positional bias ``[H, 2k-1]`` added to the scaled logits (stride 1 only).
        return_lse: Also return the natural log-sum-exp of the logits, ``[B, L, H]``.
        backend: None/``'auto'``, ``'triton'`` or ``'reference'``.

    Returns:
        ``out`` of the shape and dtype of `query`, or ``(out, lse)`` when `return_lse` is true.
    """
    return _na(1, "na1d", query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend)


def na2d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: Optional[float] = None,
    rpb: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Output:
    """2-D neighborhood attention over ``[B, X, Y, heads, head_dim]`` tensors.

    Arguments as in :func:`na1d`, per axis where a tuple is given; `rpb` is ``[H, 2k_0-1, 2k_1-1]``.
    """
    return _na(2, "na2d", query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend)


def na3d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: Optional[float] = None,
    rpb: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Output:
    """3-D neighborhood attention over ``[B, X, Y, Z, heads, head_dim]`` tensors.

    Arguments as in :func:`na1d`, per axis where a tuple is given; `rpb` is ``[H, 2k_0-1, 2k_1-1, 2k_2-1]``.
    """
    return _na(3, "na3d", query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend)
