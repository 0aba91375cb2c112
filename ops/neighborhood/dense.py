"""The ``dense`` backend: attention over all tokens with the neighbourhood as an additive bias.

Every query scores every key of its ``[B, heads]`` slice; keys outside its neighbourhood get ``-inf`` and the others
the rpb entry of their offset (0 without rpb), so the softmax, and with it every output and gradient, is exactly the
op's. Without ``return_lse`` the product runs in :func:`torch.nn.functional.scaled_dot_product_attention` (PyTorch's
fused kernels on CUDA, tensor cores included), which does not return the log-sum-exp; with it, the same masked
logits go through an explicit float32 (float64) ``logsumexp``/``softmax`` so that a gradient can flow into ``lse``.
Gradients for q, k, v and rpb come from autograd.

It does not depend on the project's Triton kernels: a second GPU path to compare with them and to fall back on where
they cannot run. Its cost is ``O(N^2)`` per ``(batch, head)`` in time and, for the bias, ``heads * N^2`` in memory,
so it is only for maps of a few thousand tokens; larger problems are refused (``MAX_ELEMENTS``).

Precision: q, k, v stay in their dtype in the fused path, and the bias is rounded to that dtype (PyTorch's kernels
take the mask in the query dtype); float16/bfloat16 therefore see rpb rounded to 8 or 11 bits, where the other
backends add it in float32.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .indexing import group_length, window
from .reference import accumulation_dtype
from .validation import Problem

# The largest bias (heads x N x N, or N x N without rpb) or score tensor (B x heads x N x N, lse path) the backend
# builds: 2**28 elements, 1 GiB in float32.
MAX_ELEMENTS = 2**28


def _axis_tables(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> tuple[torch.Tensor, ...]:
    """``allowed [L, L]`` (query x key) and the rpb index ``(k - 1) + (j - i)`` on one axis (0 where not allowed)."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    index = torch.zeros(length, length, dtype=torch.long)
    for x in range(length):
        g, i = x % dilation, x // dilation
        start, end = window(i, group_length(length, dilation, g), kernel, stride, causal)
        keys = torch.arange(start, end)
        allowed[x, g + dilation * keys] = True
        index[x, g + dilation * keys] = (kernel - 1) + keys - i
    return allowed, index


@functools.lru_cache(maxsize=16)
def dense_tables(
    spatial: tuple[int, ...], kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
    is_causal: tuple[bool, ...], device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask [N, N]`` (True where the key is in the query's neighbourhood) and the flat rpb index ``[N, N]``
    (row-major over ``[2k_0-1, ...]``; 0 where masked), tokens in row-major order of `spatial`."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    flat = torch.zeros(1, 1, dtype=torch.long)
    for length, k, s, d, c in zip(spatial, kernel_size, stride, dilation, is_causal):
        allowed, index = _axis_tables(length, k, s, d, c)
        size = mask.shape[0] * length
        # [Np, L, Np, L]: the previous axes' pairs times this axis' pairs, then flattened in row-major token order.
        mask = (mask[:, None, :, None] & allowed[None, :, None, :]).reshape(size, size)
        flat = (flat[:, None, :, None] * (2 * k - 1) + index[None, :, None, :]).reshape(size, size)
    flat = torch.where(mask, flat, 0)
    return mask.to(device), flat.to(device)


def dense_unsupported_reason(problem: Problem, has_rpb: bool, need_lse: bool) -> str | None:
    """None when the dense tensors of this problem stay within ``MAX_ELEMENTS``, else why not."""
    tokens = problem.num_tokens
    bias = (problem.heads if has_rpb else 1) * tokens * tokens
    if bias > MAX_ELEMENTS:
        return (f"its {'heads x ' if has_rpb else ''}N x N bias would hold {bias:,} elements for N={tokens} tokens "
                f"(limit {MAX_ELEMENTS:,})")
    scores = problem.batch * problem.heads * tokens * tokens
    if need_lse and scores > MAX_ELEMENTS:
        return (f"return_lse needs the B x heads x N x N scores, {scores:,} elements for B={problem.batch}, "
                f"heads={problem.heads}, N={tokens} (limit {MAX_ELEMENTS:,})")
    return None


def na_dense(
    problem: Problem,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Neighborhood attention through dense attention with a neighbourhood bias.

    Args:
        problem: The validated problem.
        query: ``[B, *S, H, D]`` (any strides); `key` and `value` alike.
        rpb: ``[H, 2k_0-1, ...]`` or None.
        need_lse: Also return ``lse [B, *S, H]`` (float32; float64 for float64 inputs), differentiable.

    Returns:
        ``out [B, *S, H, D]`` contiguous in `query`'s dtype, and ``lse`` or None.

    Raises:
        ValueError: The dense tensors would exceed ``MAX_ELEMENTS`` (choose ``backend='triton'`` or ``'reference'``).
    """
    reason = dense_unsupported_reason(problem, rpb is not None, need_lse)
    if reason is not None:
        raise ValueError(f"{problem.name}: backend='dense' cannot run this problem: {reason}; use backend='triton' "
                         "or backend='reference'")
    batch, heads, head_dim, tokens = problem.batch, problem.heads, problem.head_dim, problem.num_tokens
    mask, flat = dense_tables(problem.spatial, problem.kernel_size, problem.stride, problem.dilation,
                              problem.is_causal, query.device)

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, tokens, heads, head_dim).transpose(1, 2)  # [B, H, N, D]

    q, k, v = heads_first(query), heads_first(key), heads_first(value)
    acc = accumulation_dtype(problem.dtype)
    bias = None
    if rpb is not None:
        bias = rpb.to(acc).flatten(1)[:, flat].masked_fill(~mask, -math.inf)  # [H, N, N]
    if need_lse:
        logits = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * problem.scale  # [B, H, N, N]
        logits = logits + bias if bias is not None else logits.masked_fill(~mask, -math.inf)
        lse = torch.logsumexp(logits, dim=-1)  # [B, H, N]
        out = (torch.exp(logits - lse[..., None]) @ v.to(acc)).to(problem.dtype)
        lse = lse.transpose(1, 2).reshape(batch, *problem.spatial, heads).contiguous()
    else:
        attn_mask = bias.to(problem.dtype) if bias is not None else mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=problem.scale)
        lse = None
    out = out.transpose(1, 2).reshape(batch, *problem.spatial, heads, head_dim).contiguous()
    return out, lse
