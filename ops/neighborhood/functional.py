"""Functional neighborhood attention: ``na1d``, ``na2d``, ``na3d`` (NATTEN-compatible names and layout), and
:func:`neighborhood_attention`, the entry that runs an already validated problem (what the modules call)."""

from __future__ import annotations

from typing import Literal, overload

import torch

from .dispatch import TABLE, Request, select_backend
from .extra_kv import na_with_extras
from .validation import BoolOrTuple, IntOrTuple, Problem, check_problem

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@overload
def neighborhood_attention(
    problem: Problem, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor | None = ...,
    return_lse: Literal[False] = ..., dropout_p: float = ..., backend: str | None = ...,
) -> torch.Tensor: ...


@overload
def neighborhood_attention(
    problem: Problem, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor | None,
    return_lse: Literal[True], dropout_p: float = ..., backend: str | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def neighborhood_attention(
    problem: Problem, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor | None,
    return_lse: bool, dropout_p: float = ..., backend: str | None = ...,
) -> Output: ...


def neighborhood_attention(
    problem: Problem,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> Output:
    """Runs a validated problem on the backend :func:`dispatch.select_backend` chooses.

    Args:
        problem: From :func:`validation.check_problem` for these tensors (the checks are not repeated).
        query: ``[B, *S, H, D]``; `key` and `value` alike.
        rpb: ``[H, 2k_0-1, ...]`` or None.
        return_lse: Also return ``lse [B, *S, H]``.
        dropout_p: Dropout on the attention probabilities (only the reference backend has it; auto selection then
            picks it, a forced ``triton``, ``cpu`` or ``dense`` backend raises ValueError).
        backend: None/``'auto'``, ``'triton'``, ``'cpu'``, ``'dense'`` or ``'reference'``.

    Returns:
        ``out`` of the shape and dtype of `query`, or ``(out, lse)`` when `return_lse` is true.
    """
    name = select_backend(problem, backend, rpb is not None, return_lse, dropout_p)
    out, lse = TABLE[name].run(problem, query, key, value, rpb, Request(rpb is not None, return_lse, dropout_p))
    if not return_lse:
        return out
    assert lse is not None  # every backend computes it when asked (need_lse)
    return out, lse


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
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> Output:
    problem = check_problem(fn, n, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, backend,
                            additional_keys, additional_values)
    if additional_keys is not None or key.shape[-2] != problem.heads:
        return na_with_extras(problem, neighborhood_attention, query, key, value, rpb, additional_keys,
                              additional_values, return_lse, backend)
    return neighborhood_attention(problem, query, key, value, rpb, return_lse, backend=backend)


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
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> Output:
    """1-D neighborhood attention over ``[B, L, heads, head_dim]`` tensors.

    Args:
        query: ``[B, L, H, D]``.
        key: ``[B, L, H_kv, D]``, dtype and device of `query`; ``H_kv`` divides ``H`` (GQA/MQA: query head ``h``
            reads key head ``h // (H // H_kv)``).
        value: Same shape as `key`.
        kernel_size: Window size ``k >= 2``.
        stride: Query-block stride, ``1 <= s <= k``.
        dilation: Dilation ``d >= 1`` with ``k * d <= L``.
        is_causal: Causal masking.
        scale: Logit scale; None means ``D ** -0.5``.
        rpb: Relative positional bias ``[H, 2k-1]`` added to the scaled logits (stride 1 only).
        return_lse: Also return the natural log-sum-exp of the logits, ``[B, L, H]``.
        additional_keys: ``[B, n_extra, H_kv, D]`` tokens every query attends to besides its neighborhood, in the
            same softmax (no rpb); given together with `additional_values`.
        additional_values: ``[B, n_extra, H_kv, D]``.
        backend: None/``'auto'``, ``'triton'``, ``'cpu'``, ``'dense'`` or ``'reference'`` (docs/ops.md, "Backends").

    Returns:
        ``out`` of the shape and dtype of `query`, or ``(out, lse)`` when `return_lse` is true.
    """
    return _na(1, "na1d", query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend,
               additional_keys, additional_values)


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
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> Output:
    """2-D neighborhood attention over ``[B, X, Y, heads, head_dim]`` tensors.

    Arguments as in :func:`na1d`, per axis where a tuple is given; `rpb` is ``[H, 2k_0-1, 2k_1-1]``.
    """
    return _na(2, "na2d", query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend,
               additional_keys, additional_values)


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
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> Output:
    """3-D neighborhood attention over ``[B, X, Y, Z, heads, head_dim]`` tensors.

    Arguments as in :func:`na1d`, per axis where a tuple is given; `rpb` is ``[H, 2k_0-1, 2k_1-1, 2k_2-1]``.
    """
    return _na(3, "na3d", query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend,
               additional_keys, additional_values)
