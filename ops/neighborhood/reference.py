"""Pure-PyTorch neighborhood attention: the semantic ground truth of the project's kernels.

Queries are cut into small multi-axis tiles; each tile gathers the halo of keys its windows cover (cached index
tables from :func:`ops.neighborhood.indexing.tile_tables`) and runs dense products masked to the exact windows, so
memory is ``O(N * halo * head_dim)`` with a halo of a few windows, never ``O(N^2)``. Autograd provides every
gradient, second order included. Works on any device and in float16/bfloat16/float32/float64; low-precision inputs
are computed in float32.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from .indexing import default_tile, tile_tables
from .validation import Problem


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other supported dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_eager: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None


def _eager_reference() -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The reference behind ``torch.compiler.disable``, built once.

    Built outside compiled regions whenever possible (calling ``torch.compiler.disable`` while tracing costs extra
    graph breaks), but never by importing torch._dynamo just for it: that import takes seconds and pulls in
    triton.language. timm and Lightning import it anyway, so in practice the wrapper exists before any tracing.
    """
    global _eager
    if _eager is None:
        _eager = torch.compiler.disable(_na_reference)
    return _eager


def _prepare_eager_reference() -> None:
    if _eager is None and "torch._dynamo" in sys.modules:
        _eager_reference()


def na_reference(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference neighborhood attention; see :func:`_na_reference` for the arguments.

    Under torch.compile it runs eagerly behind one graph break per call: inductor fails to generate code for its
    gathers with constant index tensors in inference graphs. Full-graph compilation is the Triton backend's job.
    """
    if torch.compiler.is_compiling():
        return _eager_reference()(*args, **kwargs)
    _prepare_eager_reference()
    return _na_reference(*args, **kwargs)


def _na_reference(
    problem: Problem,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    tile: tuple[int, ...] | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
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

    def heads_major(x: torch.Tensor) -> torch.Tensor:
        # [B, *S, H, D] -> [B, H, N, D] in the accumulation dtype, contiguous for the gathers.
        return x.reshape(batch, tokens, heads, head_dim).to(acc).transpose(1, 2).contiguous()

    def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # [B, H, N, D] -> [B, H, T_n * P, D] -> [B, H, T_n, P, D] for an index [T_n, P]
        return x.index_select(2, index.view(-1)).view(batch, heads, *index.shape, head_dim)

    # NaN/inf in a key or value row must reach only the queries whose window holds that key, yet every halo key
    # meets every query of its tile in the products. Value rows therefore enter as zeros (0 * NaN would be NaN
    # even at probability 0) and pass their non-finiteness on to their key row; the window mask below then
    # overwrites the logits of keys outside each window, so only the queries that see the key get a NaN logit.
    k, v = heads_major(key), heads_major(value)  # [B, H, N, D]
    k = k + (v * 0).sum(-1, keepdim=True)  # adds 0, or NaN to the key rows whose value row is not finite
    # The scale goes on q, the smallest operand of the product (T x D per tile against T x halo logits).
    q = gather(heads_major(query), q_idx) * problem.scale
    k, v = gather(k, k_idx), gather(v.nan_to_num(0.0, 0.0, 0.0), k_idx)
    logits = torch.matmul(q, k.transpose(-1, -2))  # [B, H, T_n, T, halo], a fresh tensor: updated in place
    if rpb is not None:
        logits.add_(rpb.to(acc).reshape(heads, -1).index_select(1, ridx.view(-1)).view(heads, *ridx.shape))
    # Overwriting (rather than adding -inf to) the halo slots outside each window keeps NaN keys out of them.
    logits.masked_fill_(~allowed, -math.inf)
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


_prepare_eager_reference()
