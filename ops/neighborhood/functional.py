"""Functional neighborhood attention: ``na1d``, ``na2d``, ``na3d`` (NATTEN-compatible names and layout)."""

from __future__ import annotations



import torch

from .dispatch import select_backend
from .reference import na_reference
from .validation import BoolOrTuple, IntOrTuple, Problem, check_problem

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _run(problem: Problem, query, key, value, rpb, return_lse: bool, backend: str | None) -> Output:
    name = select_backend(problem, backend)
    if name == "triton" and problem.batch > 0:
        from .triton import na_triton

        out, lse = na_triton(problem, query, key, value, rpb)
    else:
        # An empty batch also goes here: the reference returns empty tensors attached to the autograd graph, so a
        # backward pass gives gradients of the right shapes (zeros for rpb).
        # need_lse=return_lse: lse is a tensor whenever it is returned
        out, lse = na_reference(problem, query, key, value, rpb, need_lse=return_lse)  # type: ignore[assignment]
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
    scale: float | None,
    rpb: torch.Tensor | None,
    return_lse: bool,
    backend: str | None,
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
    scale: float | None = None,
    rpb: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
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
    scale: float | None = None,
    rpb: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
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
    scale: float | None = None,
    rpb: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Output:
    """3-D neighborhood attention over ``[B, X, Y, Z, heads, head_dim]`` tensors.

    Arguments as in :func:`na1d`, per axis where a tuple is given; `rpb` is ``[H, 2k_0-1, 2k_1-1, 2k_2-1]``.
    """
    return _na(3, "na3d", query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend)
