"""``natzoo::na_cpu`` and its backward: the compiled CPU kernels as custom operators.

Eagerly and under ``torch.compile`` the forward is one operator with a registered backward operator (``dq, dk, dv,
d_rpb`` from the saved inputs and ``lse``); second-order gradients are not defined (use ``backend='reference'``).
float32 and float64 run natively; float16/bfloat16 inputs are computed in float32 (as the reference does) by casts
outside the operator, which autograd differentiates.
"""

from __future__ import annotations

import ctypes

import torch

from ..validation import Problem
from .build import load

_NATIVE = {torch.float32: "f32", torch.float64: "f64"}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its head_dim is contiguous (the kernels take any other strides), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _geometry(query: torch.Tensor, kernel_size: list[int], stride: list[int], dilation: list[int],
              is_causal: list[bool], scale: float, inputs: tuple[torch.Tensor, ...]) -> list:
    """The kernels' shape arguments; `inputs` (q, k, v[, dO]) give their element strides."""
    batch, *spatial, heads, head_dim = query.shape
    n = len(spatial)

    def arr(values) -> ctypes.Array:
        return (ctypes.c_int64 * len(values))(*values)

    strides = [s for t in inputs for s in t.stride()]
    return [batch, heads, head_dim, n, arr(spatial), arr(kernel_size), arr(stride), arr(dilation),
            arr([int(c) for c in is_causal]), arr(strides), float(scale), max(1, torch.get_num_threads())]


def _library():
    lib, reason = load()
    if lib is None:
        raise RuntimeError(f"natzoo::na_cpu: {reason}")
    return lib


def _forward_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor | None,
                    kernel_size: list[int], stride: list[int], dilation: list[int], is_causal: list[bool],
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``out [B, *S, H, D]`` and ``lse [B, *S, H]``, both in the dtype of `query` (float32 or float64)."""
    q, k, v = _rows(query), _rows(key), _rows(value)  # e.g. views into a packed qkv projection: no copies
    r = None if rpb is None else rpb.to(query.dtype).contiguous()
    out, lse = q.new_empty(q.shape), q.new_empty(q.shape[:-1])
    fn = getattr(_library(), f"natzoo_na_forward_{_NATIVE[query.dtype]}")
    fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(r), out.data_ptr(), lse.data_ptr(),
       *_geometry(q, kernel_size, stride, dilation, is_causal, scale, (q, k, v)))
    return out, lse


@torch.library.custom_op("natzoo::na_cpu", mutates_args=())
def _forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor | None,
             kernel_size: list[int], stride: list[int], dilation: list[int], is_causal: list[bool],
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_forward_kernel` as an operator (autograd, ``torch.compile``)."""
    return _forward_kernel(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale)


@_forward.register_fake
def _forward_fake(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale):
    return query.new_empty(query.shape), query.new_empty(query.shape[:-1])


def _backward_kernel(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, rpb: torch.Tensor | None, lse: torch.Tensor, kernel_size: list[int],
                     stride: list[int], dilation: list[int], is_causal: list[bool], scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` (shapes and dtype of `query`) and ``d_rpb`` (rpb's shape and dtype; empty without rpb)."""
    q, k, v, g = (_rows(t) for t in (query, key, value, grad_out))
    lse = lse.contiguous()
    gl = None if grad_lse is None else grad_lse.to(q.dtype).contiguous()
    r = None if rpb is None else rpb.to(query.dtype).contiguous()
    dq, dk, dv = (q.new_empty(q.shape) for _ in range(3))  # every element is written by the kernels
    d_rpb = q.new_empty(0) if r is None else torch.empty_like(r)
    fn = getattr(_library(), f"natzoo_na_backward_{_NATIVE[query.dtype]}")
    fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(r), lse.data_ptr(), g.data_ptr(), _ptr(gl), dq.data_ptr(),
       dk.data_ptr(), dv.data_ptr(), None if r is None else d_rpb.data_ptr(),
       *_geometry(q, kernel_size, stride, dilation, is_causal, scale, (q, k, v, g)))
    return dq, dk, dv, d_rpb if rpb is None else d_rpb.to(rpb.dtype)


@torch.library.custom_op("natzoo::na_cpu_backward", mutates_args=())
def _backward(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, rpb: torch.Tensor | None, lse: torch.Tensor, kernel_size: list[int],
              stride: list[int], dilation: list[int], is_causal: list[bool], scale: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_backward_kernel` as an operator."""
    return _backward_kernel(grad_out, grad_lse, query, key, value, rpb, lse, kernel_size, stride, dilation, is_causal,
                            scale)


@_backward.register_fake
def _backward_fake(grad_out, grad_lse, query, key, value, rpb, lse, kernel_size, stride, dilation, is_causal, scale):
    d_rpb = query.new_empty(0) if rpb is None else rpb.new_empty(rpb.shape)
    return query.new_empty(query.shape), query.new_empty(query.shape), query.new_empty(query.shape), d_rpb


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, rpb, *ctx.window, ctx.scale = inputs
    ctx.has_rpb = rpb is not None
    ctx.save_for_backward(query, key, value, rpb, output[1])


def _gradients(ctx, grad_out, grad_lse, backward) -> tuple:
    """The gradients of both autograd routes; `backward` is the operator or the plain kernel call."""
    query, key, value, rpb, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(query)
    dq, dk, dv, d_rpb = backward(grad_out, grad_lse, query, key, value, rpb, lse, *ctx.window, ctx.scale)
    return dq, dk, dv, d_rpb if ctx.has_rpb else None, None, None, None, None, None


def _autograd_backward(ctx, grad_out, grad_lse):
    return _gradients(ctx, grad_out, grad_lse, _backward)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


class _EagerFunction(torch.autograd.Function):
    """The same forward and backward for eager autograd, without the operators' dispatch (about 0.3 ms and many Python
    objects per training call, much of it garbage collection); `torch.compile` traces the operators instead."""

    @staticmethod
    def forward(ctx, query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale):
        out, lse = _forward_kernel(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale)
        _setup_context(ctx, (query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale), (out, lse))
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # second order: RuntimeError, as the operator (not zeros)
    def backward(ctx, grad_out, grad_lse):
        return _gradients(ctx, grad_out, grad_lse, _backward_kernel)


def na_cpu(problem: Problem, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor | None,
           need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused op on the CPU kernels.

    Returns:
        ``out`` in `query`'s dtype and ``lse`` (float64 for float64 inputs, float32 otherwise) or None.
    """
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = (t.to(compute) for t in (query, key, value))
    tensors = (q, k, v) if rpb is None else (q, k, v, rpb)
    # Eager calls skip the operators' dispatch (same kernels): plainly when autograd records nothing, else through an
    # autograd.Function. Under torch.compile the operators are traced.
    if torch.compiler.is_compiling():
        fn = _forward
    elif torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        fn = _EagerFunction.apply
    else:
        fn = _forward_kernel
    out, lse = fn(q, k, v, rpb, list(problem.kernel_size), list(problem.stride), list(problem.dilation),
                        list(problem.is_causal), float(problem.scale))
    return out.to(query.dtype), lse if need_lse else None
