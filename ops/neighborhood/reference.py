"""Pure-PyTorch neighborhood attention: the semantic ground truth of the project's kernels.

Queries are cut into small multi-axis tiles; each tile gathers the halo of keys its windows cover (cached index
tables from :func:`ops.neighborhood.indexing.tile_tables`) and runs dense products masked to the exact windows, so
memory is ``O(N * halo * head_dim)`` with a halo of a few windows, never ``O(N^2)``. Autograd provides every
gradient, second order included. Works on any device and in float16/bfloat16/float32/float64; low-precision inputs
are computed in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .indexing import default_tile, tile_tables
from .validation import Problem


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other supported dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=1)
def _eager_reference() -> Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    # Built on first use under torch.compile: wrapping at import time would import torch._dynamo (and through it
    # triton.language) whenever `ops` is imported.
    return torch.compiler.disable(_na_reference)


def na_reference(*args, **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Reference neighborhood attention; see :func:`_na_reference` for the arguments.

    Under torch.compile it runs eagerly behind a graph break: inductor (torch 2.15) fails to generate code for its
    gathers with constant index tensors in inference graphs. Full-graph compilation is the Triton backend's job.
    """
    if torch.compiler.is_compiling():
        return _eager_reference()(*args, **kwargs)
    return _na_reference(*args, **kwargs)


def _na_reference(
    problem: Problem,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    tile: Optional[Tuple[int, ...]] = None,
    need_lse: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Neighborhood attention by gathering, for each tile of queries, the halo of keys its windows cover.

    Args:
        problem: The validated problem (shapes, window arguments, scale).
        query: ``[B, *S, H, D]``, any strides.
        key: Same shape as `query`.
        value: Same shape as `query`.
        rpb: ``[H, 2k_0-1, ...]`` or None; added to the scaled logits in the accumulation dtype.
        dropout_p: Dropout on the attention probabilities (the modules' ``attn_drop`` in training mode).
        tile: Query-tile extent per axis in in-group steps; None picks :func:`default_tile`. A tile of 1 on every
            axis gathers exactly each query's own window.
        need_lse: Whether to compute ``lse`` (None is returned in its place otherwise).

    Returns:
        ``out`` ``[B, *S, H, D]`` in the dtype of `query` and ``lse`` ``[B, *S, H]`` (natural log) in the
        accumulation dtype. ``lse`` does not see the dropout.
    """
    acc = accumulation_dtype(query.dtype)
    batch, heads, head_dim, tokens = problem.batch, problem.heads, problem.head_dim, problem.num_tokens
    if tile is None:
        tile = default_tile(problem.kernel_size, problem.dilation, problem.spatial)
    q_idx, k_idx, allowed, ridx, owner = tile_tables(
        problem.spatial, problem.kernel_size, problem.stride, problem.dilation, problem.is_causal, tile, query.device
    )
    n_tiles, tile_len, halo = allowed.shape

    def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # [B, *S, H, D] -> [B, H, N, D] -> [B, H, T_n * P, D] -> [B, H, T_n, P, D], contiguous for the products.
        x = x.reshape(batch, tokens, heads, head_dim).to(acc).transpose(1, 2).contiguous()
        return x.index_select(2, index.view(-1)).view(batch, heads, n_tiles, -1, head_dim)

    # The scale goes on q, the smallest operand of the product (T x D per tile against T x halo logits).
    q, k, v = gather(query, q_idx) * problem.scale, gather(key, k_idx), gather(value, k_idx)
    logits = torch.matmul(q, k.transpose(-1, -2))  # [B, H, T_n, T, halo]
    if rpb is None:
        bias = torch.zeros(allowed.shape, dtype=acc, device=query.device)
    else:
        bias = rpb.to(acc).reshape(heads, -1)[:, ridx]  # [H, T_n, T, halo]
    # Keys of the halo outside a query's window get -inf, folded into the bias so the big tensor sees one add.
    logits = logits + bias.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    lse = torch.logsumexp(logits, dim=-1) if need_lse else None
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v).view(batch, heads, n_tiles * tile_len, head_dim)
    # Each query's result from the tile that owns it, back to [B, *S, H, D].
    out = out.index_select(2, owner).transpose(1, 2).to(query.dtype)
    out = out.reshape(batch, *problem.spatial, heads, head_dim).contiguous()
    if lse is None:
        return out, None
    lse = lse.view(batch, heads, n_tiles * tile_len).index_select(2, owner).transpose(1, 2)
    return out, lse.reshape(batch, *problem.spatial, heads).contiguous()
