"""``torch.library`` registration of the Triton kernels: ``natzoo::na_fwd`` and ``natzoo::na_bwd``.

Both are custom operators with fake (meta) implementations, and ``na_fwd`` carries an autograd formula that calls
``na_bwd``, so ``torch.compile(fullgraph=True)`` traces through them without graph breaks and the kernels stay
opaque to the compiler.
"""

from __future__ import annotations

import torch

from ..validation import Problem
from .backward import na_backward
from .forward import na_forward


def _problem(query: torch.Tensor, kernel_size, stride, dilation, is_causal, scale: float) -> Problem:
    batch, *spatial, heads, head_dim = query.shape
    return Problem(
        name=f"na{len(spatial)}d",
        n=len(spatial),
        batch=batch,
        spatial=tuple(spatial),
        heads=heads,
        head_dim=head_dim,
        kernel_size=tuple(kernel_size),
        stride=tuple(stride),
        dilation=tuple(dilation),
        is_causal=tuple(is_causal),
        scale=scale,
        dtype=query.dtype,
        device=query.device,
    )


@torch.library.custom_op("natzoo::na_fwd", mutates_args=())
def na_fwd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    is_causal: list[bool],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: ``out [B, *S, H, D]`` (query dtype, contiguous) and natural-log ``lse [B, *S, H]`` float32."""
    problem = _problem(query, kernel_size, stride, dilation, is_causal, scale)
    return na_forward(problem, query, key, value, rpb)


@na_fwd.register_fake
def _na_fwd_fake(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale):
    out = query.new_empty(query.shape)
    lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("natzoo::na_bwd", mutates_args=())
def na_bwd(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    dilation: list[int],
    is_causal: list[bool],
    scale: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: ``dq, dk, dv`` and ``d_rpb`` (rpb's shape and dtype).

    `needs` says which of ``query, key, value, rpb`` need a gradient; the others (and ``d_rpb`` without rpb) come
    back as empty tensors and cost no work.
    """
    problem = _problem(query, kernel_size, stride, dilation, is_causal, scale)
    # Read at run time (not trace time), so a compiled graph follows the current setting.
    deterministic = torch.are_deterministic_algorithms_enabled()
    # four flags: one per input of the op
    grads = na_backward(problem, grad_out, grad_lse, query, key, value, rpb, out, lse, deterministic, tuple(needs))  # type: ignore[arg-type]
    # four gradients: one per input of the op
    return tuple(g if g is not None else query.new_empty((0,)) for g in grads)  # type: ignore[return-value]


@na_bwd.register_fake
def _na_bwd_fake(grad_out, grad_lse, query, key, value, rpb, out, lse, kernel_size, stride, dilation, is_causal,
                 scale, needs):
    shapes = (query, query, query, rpb if rpb is not None else None)
    return tuple(like.new_empty(like.shape) if need and like is not None else query.new_empty((0,))
                 for need, like in zip(needs, shapes))


def _setup_context(ctx, inputs, output):
    query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, rpb, out, lse)
    ctx.params = (list(kernel_size), list(stride), list(dilation), list(is_causal), float(scale))


def _backward(ctx, grad_out, grad_lse):
    query, key, value, rpb, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    needs = [bool(x) for x in ctx.needs_input_grad[:4]]
    needs[3] = needs[3] and rpb is not None
    grads = na_bwd(grad_out, grad_lse, query, key, value, rpb, out, lse, *ctx.params, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None)


na_fwd.register_autograd(_backward, setup_context=_setup_context)
