"""Pure-PyTorch neighborhood attention: the semantic ground truth of the project's kernels.

Queries are cut into small multi-axis tiles; each tile gathers the halo of keys its windows cover (cached index
tables from :func:`ops.neighborhood.indexing.tile_tables`) and runs dense products masked to the exact windows, so
memory is ``O(N * halo * head_dim)`` with a halo of a few windows, never ``O(N^2)``. Run eagerly, autograd provides
every gradient, second order included; under ``torch.compile`` the path is a custom operator with a registered
backward (:mod:`.reference_op`). Works on any device and in float16/bfloat16/float32/float64; low-precision inputs
are computed in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .indexing import default_tile, tile_tables
from .validation import Problem


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other supported dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def na_reference(
    problem: Problem,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    tile: tuple[int, ...] | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference neighborhood attention, eagerly (autograd gives every gradient, second order included); see
    :func:`_na_reference` for the arguments. Under ``torch.compile`` the reference backend
    (:class:`.dispatch.ReferenceBackend`) runs the custom operator of :mod:`.reference_op` instead."""
    return _na_reference(problem, query, key, value, rpb, dropout_p, tile, need_lse)


class TileScores(NamedTuple):
    """What the forward and the compiled backward share: the gathered operands and masked logits of every tile."""

    q: torch.Tensor  # [B, H, T_n, T, D] queries times the scale
    k: torch.Tensor  # [B, H, T_n, halo, D]
    v: torch.Tensor  # [B, H, T_n, halo, D], non-finite entries zeroed
    logits: torch.Tensor  # [B, H, T_n, T, halo], -inf outside each query's window
    allowed: torch.Tensor  # [T_n, T, halo] key slot inside the query's window
    q_idx: torch.Tensor  # [T_n, T] flat token of each tile slot
    k_idx: torch.Tensor  # [T_n, halo]
    ridx: torch.Tensor  # [T_n, T, halo] flat index into rpb[h]
    owner: torch.Tensor  # [N] tile slot holding each query's result


def heads_major(problem: Problem, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``[B, *S, H, D]`` -> ``[B, H, N, D]`` in the accumulation dtype, contiguous for the gathers."""
    x = x.reshape(problem.batch, problem.num_tokens, problem.heads, problem.head_dim)
    return x.to(acc).transpose(1, 2).contiguous()


def tile_scores(
    problem: Problem,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    tile: tuple[int, ...] | None,
) -> TileScores:
    """Gathers each tile's queries and key halo and computes the masked, biased logits (see :func:`_na_reference`)."""
    acc = accumulation_dtype(query.dtype)
    batch, heads, head_dim = problem.batch, problem.heads, problem.head_dim
    if tile is None:
        tile = default_tile(problem.kernel_size, problem.dilation, problem.spatial)
    q_idx, k_idx, allowed, ridx, owner = tile_tables(
        problem.spatial, problem.kernel_size, problem.stride, problem.dilation, problem.is_causal, tile, query.device
    )

    def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # [B, H, N, D] -> [B, H, T_n * P, D] -> [B, H, T_n, P, D] for an index [T_n, P]
        return x.index_select(2, index.view(-1)).view(batch, heads, *index.shape, head_dim)

    # NaN/inf in a key or value row must reach only the queries whose window holds that key, yet every halo key
    # meets every query of its tile in the products. Value rows therefore enter as zeros (0 * NaN would be NaN
    # even at probability 0) and pass their non-finiteness on to their key row; the window mask below then
    # overwrites the logits of keys outside each window, so only the queries that see the key get a NaN logit.
    k, v = heads_major(problem, key, acc), heads_major(problem, value, acc)  # [B, H, N, D]
    k = k + (v * 0).sum(-1, keepdim=True)  # adds 0, or NaN to the key rows whose value row is not finite
    # The scale goes on q, the smallest operand of the product (T x D per tile against T x halo logits).
    q = gather(heads_major(problem, query, acc), q_idx) * problem.scale
    k, v = gather(k, k_idx), gather(v.nan_to_num(0.0, 0.0, 0.0), k_idx)
    logits = torch.matmul(q, k.transpose(-1, -2))  # [B, H, T_n, T, halo], a fresh tensor: updated in place
    if rpb is not None:
        logits.add_(rpb.to(acc).reshape(heads, -1).index_select(1, ridx.view(-1)).view(heads, *ridx.shape))
    # Overwriting (rather than adding -inf to) the halo slots outside each window keeps NaN keys out of them.
    logits.masked_fill_(~allowed, -math.inf)
    return TileScores(q, k, v, logits, allowed, q_idx, k_idx, ridx, owner)


def dropout_keep(probs: torch.Tensor, dropout_p: float, generator: torch.Generator) -> torch.Tensor:
    """Dropout multiplier (0 or ``1 / (1 - p)``) of the shape of `probs`, drawn from `generator`.

    The compiled path draws it from a generator seeded per call, so its backward can draw the same mask again.
    """
    return torch.empty_like(probs).bernoulli_(1.0 - dropout_p, generator=generator).div_(1.0 - dropout_p)


def _na_reference(
    problem: Problem,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    tile: tuple[int, ...] | None = None,
    need_lse: bool = True,
    generator: torch.Generator | None = None,
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
        generator: Draws the dropout mask with :func:`dropout_keep` (the compiled path); None uses ``F.dropout``.

    Returns:
        ``out`` ``[B, *S, H, D]`` in the dtype of `query` and ``lse`` ``[B, *S, H]`` (natural log) in the
        accumulation dtype. ``lse`` does not see the dropout.
    """
    batch, heads, head_dim = problem.batch, problem.heads, problem.head_dim
    scores = tile_scores(problem, query, key, value, rpb, tile)
    n_tiles, tile_len = scores.logits.shape[2:4]
    probs = torch.softmax(scores.logits, dim=-1)
    lse = torch.logsumexp(scores.logits, dim=-1) if need_lse else None
    if dropout_p > 0.0:
        if generator is None:
            probs = F.dropout(probs, p=dropout_p, training=True)
        else:
            probs = probs * dropout_keep(probs, dropout_p, generator)
    out = torch.matmul(probs, scores.v).view(batch, heads, n_tiles * tile_len, head_dim)
    # Each query's result from the tile that owns it, back to [B, *S, H, D].
    owner = scores.owner
    out = out.index_select(2, owner).transpose(1, 2).to(query.dtype)
    out = out.reshape(batch, *problem.spatial, heads, head_dim).contiguous()
    if lse is None:
        return out, None
    lse = lse.view(batch, heads, n_tiles * tile_len).index_select(2, owner).transpose(1, 2)
    return out, lse.reshape(batch, *problem.spatial, heads).contiguous()
