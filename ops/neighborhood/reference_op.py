"""The reference path as one opaque operator for ``torch.compile``: ``natzoo::na_reference`` and its backward.

Traced op by op, the reference would hand the compiler gathers over index tables whose sizes are Python functions of
the spatial shape: under dynamic shapes those sizes are symbolic and the table builder cannot run, and inductor also
fails to generate code for the gathers with constant index tensors. As a custom operator the reference is one node
of the graph: a fake implementation gives its output shapes (those of the inputs), the real implementation runs the
eager reference with the real shapes of each call, and a registered backward (a second custom operator, written
from the same tile gathers) gives ``dq, dk, dv, d_rpb``. The forward numerics are those of the eager reference; the
backward agrees with eager autograd to rounding.

Dropout on the attention probabilities draws its mask from a generator seeded by a random int64 drawn in the graph,
so the backward can draw the same mask again. Gradients of gradients are eager-only (the backward operator has no
backward of its own).
"""

from __future__ import annotations

import torch

from .reference import (
    _na_reference,
    accumulation_dtype,
    dropout_keep,
    heads_major,
    tile_scores,
)
from .validation import Problem

__all__ = ["na_reference_op"]

_SEED_HIGH = 2**62


def _problem(
    query: torch.Tensor, kernel_size: list[int], stride: list[int], dilation: list[int], is_causal: list[bool],
    scale: float,
) -> Problem:
    """The validated problem again, from the real shapes of this call (its arguments were checked at trace time)."""
    batch, *spatial, heads, head_dim = query.shape
    n = len(spatial)
    return Problem(
        name=f"na{n}d", n=n, batch=batch, spatial=tuple(spatial), heads=heads, head_dim=head_dim,
        kernel_size=tuple(kernel_size), stride=tuple(stride), dilation=tuple(dilation), is_causal=tuple(is_causal),
        scale=scale, dtype=query.dtype, device=query.device,
    )


def _generator(seed: torch.Tensor | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


@torch.library.custom_op("natzoo::na_reference", mutates_args=())
def _forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor | None, seed: torch.Tensor | None,
    kernel_size: list[int], stride: list[int], dilation: list[int], is_causal: list[bool], scale: float,
    dropout_p: float, tile: list[int], need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out [B, *S, H, D]`` and ``lse [B, *S, H]`` (an empty tensor when not `need_lse`) of the eager reference."""
    problem = _problem(query, kernel_size, stride, dilation, is_causal, scale)
    out, lse = _na_reference(problem, query, key, value, rpb, dropout_p, tuple(tile) or None, need_lse,
                             _generator(seed, query.device))
    return out, lse if lse is not None else query.new_empty(0, dtype=accumulation_dtype(query.dtype))


@_forward.register_fake
def _forward_fake(query, key, value, rpb, seed, kernel_size, stride, dilation, is_causal, scale, dropout_p, tile,
                  need_lse):
    acc = accumulation_dtype(query.dtype)
    return query.new_empty(query.shape), query.new_empty(query.shape[:-1] if need_lse else (0,), dtype=acc)


@torch.library.custom_op("natzoo::na_reference_backward", mutates_args=())
def _backward(
    grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
    value: torch.Tensor, rpb: torch.Tensor | None, seed: torch.Tensor | None, kernel_size: list[int],
    stride: list[int], dilation: list[int], is_causal: list[bool], scale: float, dropout_p: float, tile: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` (shapes and dtype of `query`) and ``d_rpb`` (an empty tensor without `rpb`).

    The forward's tiles are recomputed; with ``P = softmax(logits)`` per tile, ``G`` the output gradient on the slots
    that own their query (zero elsewhere) and ``M`` the dropout multiplier:
    ``dV = (P M)^T G``, ``dP = (G V^T) M``, ``dS = P (dP - rowsum(dP P)) + P dlse``, ``dQ = scale dS K``,
    ``dK = dS^T (scale Q)``, ``d_rpb`` the sum of ``dS`` per bias index; tile rows go back to tokens by summation.
    """
    problem = _problem(query, kernel_size, stride, dilation, is_causal, scale)
    acc = accumulation_dtype(query.dtype)
    batch, heads, head_dim, tokens = problem.batch, problem.heads, problem.head_dim, problem.num_tokens
    scores = tile_scores(problem, query, key, value, rpb, tuple(tile) or None)
    n_tiles, tile_len = scores.logits.shape[2:4]
    probs = torch.softmax(scores.logits, dim=-1)  # [B, H, T_n, T, halo]
    generator = _generator(seed, query.device)
    keep = dropout_keep(probs, dropout_p, generator) if generator is not None and dropout_p > 0.0 else None

    def to_slots(grad: torch.Tensor) -> torch.Tensor:
        # [B, H, N, ...] -> [B, H, T_n, T, ...]: each query's gradient on the slot that owns it, zero on the others.
        slots = grad.new_zeros(batch, heads, n_tiles * tile_len, *grad.shape[3:])
        return slots.index_copy_(2, scores.owner, grad).view(batch, heads, n_tiles, tile_len, *grad.shape[3:])

    def to_tokens(grad: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # [B, H, T_n, P, D] -> [B, H, N, D], summing the slots that read the same token.
        flat = grad.new_zeros(batch, heads, tokens, head_dim)
        return flat.index_add_(2, index.view(-1), grad.reshape(batch, heads, index.numel(), head_dim))

    d_logits = torch.zeros_like(probs)
    dv = torch.zeros_like(scores.v)
    if grad_out is not None:
        g = to_slots(heads_major(problem, grad_out, acc))  # [B, H, T_n, T, D]
        dv = torch.matmul((probs if keep is None else probs * keep).transpose(-1, -2), g)  # [B, H, T_n, halo, D]
        dp = torch.matmul(g, scores.v.transpose(-1, -2))  # [B, H, T_n, T, halo]
        if keep is not None:
            dp = dp * keep
        d_logits = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    if grad_lse is not None and grad_lse.numel() > 0:
        g_lse = grad_lse.reshape(batch, tokens, heads).to(acc).transpose(1, 2)  # [B, H, N]
        d_logits = d_logits + probs * to_slots(g_lse)[..., None]
    # The forward overwrote the logits outside each window: no gradient flows there (not even a NaN).
    d_logits = d_logits.masked_fill(~scores.allowed, 0.0)
    dq = to_tokens(torch.matmul(d_logits, scores.k), scores.q_idx) * problem.scale
    dk = to_tokens(torch.matmul(d_logits.transpose(-1, -2), scores.q), scores.k_idx)
    dv = to_tokens(dv, scores.k_idx)
    # The forward's NaN routing (a non-finite value row zeroed, its non-finiteness added to its key row), backwards.
    v_rows = heads_major(problem, value, acc)
    dv = dv * torch.isfinite(v_rows) + 0 * dk.sum(-1, keepdim=True)

    def back(grad: torch.Tensor) -> torch.Tensor:
        return grad.transpose(1, 2).reshape(query.shape).to(query.dtype).contiguous()

    if rpb is None:
        d_rpb = query.new_empty(0)
    else:
        d_rpb = torch.zeros(heads, rpb[0].numel(), dtype=acc, device=query.device)
        d_rpb.index_add_(1, scores.ridx.view(-1), d_logits.sum(0).reshape(heads, -1))
        d_rpb = d_rpb.view(rpb.shape).to(rpb.dtype)
    return back(dq), back(dk), back(dv), d_rpb


@_backward.register_fake
def _backward_fake(grad_out, grad_lse, query, key, value, rpb, seed, kernel_size, stride, dilation, is_causal, scale,
                   dropout_p, tile):
    d_rpb = query.new_empty(0) if rpb is None else rpb.new_empty(rpb.shape)
    return query.new_empty(query.shape), query.new_empty(query.shape), query.new_empty(query.shape), d_rpb


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, rpb, seed, *ctx.window, ctx.scale, ctx.dropout_p, ctx.tile, _ = inputs
    ctx.has_rpb = rpb is not None
    ctx.save_for_backward(query, key, value, rpb, seed)


def _forward_backward(ctx, grad_out, grad_lse):
    query, key, value, rpb, seed = ctx.saved_tensors
    dq, dk, dv, d_rpb = _backward(grad_out, grad_lse, query, key, value, rpb, seed, *ctx.window, ctx.scale,
                                  ctx.dropout_p, ctx.tile)
    return dq, dk, dv, d_rpb if ctx.has_rpb else None, None, None, None, None, None, None, None, None, None


_forward.register_autograd(_forward_backward, setup_context=_setup_context)


def na_reference_op(
    problem: Problem,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    dropout_p: float,
    tile: tuple[int, ...] | None,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`natzoo.ops.neighborhood.reference.na_reference` through the custom operator (same arguments)."""
    seed = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64) if dropout_p > 0.0 else None
    out, lse = _forward(
        query, key, value, rpb, seed, list(problem.kernel_size), list(problem.stride), list(problem.dilation),
        list(problem.is_causal), float(problem.scale), float(dropout_p), list(tile or ()), need_lse,
    )
    return out, lse if need_lse else None
