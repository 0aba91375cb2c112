"""Pure-PyTorch neighborhood attention: the semantic ground truth of the project's kernels.

Each query's window is gathered through cached index tables (:func:`ops.neighborhood.indexing.neighborhood_tables`),
so memory is ``O(N * prod(k) * head_dim)``, never ``O(N^2)``. Autograd provides every gradient, second order
included. Works on any device and in float16/bfloat16/float32/float64; low-precision inputs are computed in float32.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .indexing import neighborhood_tables
from .validation import Problem


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other supported dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def na_reference(
    problem: Problem,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Neighborhood attention by gathering each query's window.

    Args:
        problem: The validated problem (shapes, window arguments, scale).
        query: ``[B, *S, H, D]``, any strides.
        key: Same shape as `query`.
        value: Same shape as `query`.
        rpb: ``[H, 2k_0-1, ...]`` or None; added to the scaled logits in the accumulation dtype.
        dropout_p: Dropout on the attention probabilities (the modules' ``attn_drop`` in training mode).

    Returns:
        ``out`` ``[B, *S, H, D]`` in the dtype of `query` and ``lse`` ``[B, *S, H]`` (natural log) in the
        accumulation dtype. ``lse`` does not see the dropout.
    """
    acc = accumulation_dtype(query.dtype)
    batch, heads, head_dim = problem.batch, problem.heads, problem.head_dim
    tokens, slots = problem.num_tokens, problem.window
    idx, valid, ridx = neighborhood_tables(
        problem.spatial, problem.kernel_size, problem.stride, problem.dilation, problem.is_causal, query.device
    )
    q = query.reshape(batch, tokens, heads, head_dim).to(acc)
    # [B, N, H, D] -> [B, N * K, H, D] -> [B, N, K, H, D]: the window of every query, gathered.
    k = key.reshape(batch, tokens, heads, head_dim).to(acc).index_select(1, idx.view(-1))
    v = value.reshape(batch, tokens, heads, head_dim).to(acc).index_select(1, idx.view(-1))
    k = k.view(batch, tokens, slots, heads, head_dim)
    v = v.view(batch, tokens, slots, heads, head_dim)
    logits = torch.einsum("bnhd,bnkhd->bnhk", q, k) * problem.scale
    if rpb is not None:
        bias = rpb.to(acc).reshape(heads, -1)[:, ridx]  # [H, N, K]
        logits = logits + bias.permute(1, 0, 2)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.einsum("bnhk,bnkhd->bnhd", probs, v)
    out = out.to(query.dtype).reshape(batch, *problem.spatial, heads, head_dim)
    return out, lse.reshape(batch, *problem.spatial, heads)
