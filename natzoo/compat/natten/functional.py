"""NATTEN's functional API (0.14 to 0.17) on natzoo's op: the unfused QK/AV ops, legacy names included, and the
fused ``na1d/na2d/na3d``.

Layouts as in NATTEN: the unfused ops are heads-first (``query [B, heads, *spatial, head_dim]``, attention weights
``[B, heads, *spatial, prod(kernel_size) (+ n_extra)]``, additional keys/values ``[B, heads, n_extra, head_dim]``);
the fused ops are heads-last (``[B, *spatial, heads, head_dim]``, additional keys/values
``[B, n_extra, heads, head_dim]``). The slot order of the weights is NATTEN's: row-major over the window.

Signatures follow the newest release that had each name (0.17.x for ``na*d_qk/av``, where ``dilation`` defaults to
1 and ``rpb``, ``is_causal``, ``additional_keys``/``additional_values`` are keywords); the older call forms still
work: ``natten2dqkrpb(query, key, rpb, dilation)`` and ``natten2dav(attn, value, dilation)`` (0.14.0 to 0.14.4, the
kernel size read from ``rpb`` or ``attn``), the 0.15 ``na*d_qk_with_bias`` names, and the 0.15 3-D forms with separate
depth arguments (``kernel_size_d, kernel_size, dilation_d, dilation``).

As in NATTEN, the fused ops treat ``scale=0``/None as ``head_dim ** -0.5`` (``scale or default``), and the unfused
ops apply no scale.
"""

from __future__ import annotations

from typing import Any

import torch

from natzoo import ops

__all__ = [
    "na1d", "na1d_av", "na1d_qk", "na1d_qk_with_bias", "na2d", "na2d_av", "na2d_qk", "na2d_qk_with_bias", "na3d",
    "na3d_av", "na3d_qk", "na3d_qk_with_bias", "natten1dav", "natten1dqk", "natten1dqkrpb", "natten2dav",
    "natten2dqk", "natten2dqkrpb", "natten3dav", "natten3dqk", "natten3dqkrpb",
]


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    # [B, H, *S, X] -> [B, *S, H, X] (a view)
    return x.movedim(1, -2)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    # [B, *S, H, X] -> [B, H, *S, X] (a view)
    return x.movedim(-2, 1)


def _extra(x: torch.Tensor | None) -> torch.Tensor | None:
    # NATTEN's unfused extra tokens [B, H, n_extra, D] -> natzoo's [B, n_extra, H, D]
    return None if x is None else x.transpose(1, 2)


def _qk(n: int, query, key, kernel_size, dilation, additional_keys, is_causal, rpb) -> torch.Tensor:
    fn = getattr(ops, f"na{n}d_qk")
    logits = fn(_heads_last(query), _heads_last(key), kernel_size, dilation=dilation, is_causal=is_causal, rpb=rpb,
                additional_keys=_extra(additional_keys))
    return _heads_first(logits)


def _av(n: int, attn, value, kernel_size, dilation, additional_values, is_causal) -> torch.Tensor:
    fn = getattr(ops, f"na{n}d_av")
    out = fn(_heads_last(attn), _heads_last(value), kernel_size, dilation=dilation, is_causal=is_causal,
             additional_values=_extra(additional_values))
    return _heads_first(out)


def _depth_form(kernel_size: Any, dilation: Any, third: Any, fourth: Any) -> tuple[Any, Any] | None:
    """The 0.15 3-D form ``(kernel_size_d, kernel_size, dilation_d, dilation)`` as per-axis tuples, else None."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (kernel_size, dilation, third, fourth)):
        return (kernel_size, dilation, dilation), (third, fourth, fourth)
    return None


def na1d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: Any, dilation: Any = 1,
            additional_keys: torch.Tensor | None = None, is_causal: Any = False,
            rpb: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, L, D]`` x ``[B, H, L, D]`` -> logits ``[B, H, L, k (+ n_extra)]`` (no scale)."""
    return _qk(1, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na2d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: Any, dilation: Any = 1,
            additional_keys: torch.Tensor | None = None, is_causal: Any = False,
            rpb: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, X, Y, D]`` -> logits ``[B, H, X, Y, k_0 * k_1 (+ n_extra)]`` (no scale)."""
    return _qk(2, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na3d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: Any, dilation: Any = 1,
            additional_keys: Any = None, is_causal: Any = False, rpb: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, X, Y, Z, D]`` -> logits ``[B, H, X, Y, Z, k_0 * k_1 * k_2 (+ n_extra)]`` (no scale); also the 0.15
    form ``na3d_qk(query, key, kernel_size_d, kernel_size, dilation_d, dilation)``."""
    old = _depth_form(kernel_size, dilation, additional_keys, is_causal)
    if old is not None:
        return _qk(3, query, key, old[0], old[1], None, False, rpb)
    return _qk(3, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na1d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any = 1,
            additional_values: torch.Tensor | None = None, is_causal: Any = False) -> torch.Tensor:
    """Weights ``[B, H, L, k (+ n_extra)]`` x values ``[B, H, L, D]`` -> ``[B, H, L, D]``."""
    return _av(1, attn, value, kernel_size, dilation, additional_values, is_causal)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any = 1,
            additional_values: torch.Tensor | None = None, is_causal: Any = False) -> torch.Tensor:
    """Weights ``[B, H, X, Y, k_0 * k_1 (+ n_extra)]`` x values ``[B, H, X, Y, D]`` -> ``[B, H, X, Y, D]``."""
    return _av(2, attn, value, kernel_size, dilation, additional_values, is_causal)


def na3d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any = 1,
            additional_values: Any = None, is_causal: Any = False) -> torch.Tensor:
    """3-D weighted sum; also the 0.15 form ``na3d_av(attn, value, kernel_size_d, kernel_size, dilation_d,
    dilation)``."""
    old = _depth_form(kernel_size, dilation, additional_values, is_causal)
    if old is not None:
        return _av(3, attn, value, old[0], old[1], None, False)
    return _av(3, attn, value, kernel_size, dilation, additional_values, is_causal)


def na1d_qk_with_bias(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, kernel_size: Any,
                      dilation: Any, additional_keys: torch.Tensor | None = None) -> torch.Tensor:
    """NATTEN 0.15 name: :func:`na1d_qk` with the bias third."""
    return _qk(1, query, key, kernel_size, dilation, additional_keys, False, bias)


def na2d_qk_with_bias(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, kernel_size: Any,
                      dilation: Any, additional_keys: torch.Tensor | None = None) -> torch.Tensor:
    """NATTEN 0.15 name: :func:`na2d_qk` with the bias third."""
    return _qk(2, query, key, kernel_size, dilation, additional_keys, False, bias)


def na3d_qk_with_bias(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, kernel_size_d: int,
                      kernel_size: int, dilation_d: int, dilation: int) -> torch.Tensor:
    """NATTEN 0.15 name: 3-D logits with separate depth kernel and dilation."""
    return _qk(3, query, key, (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation), None, False,
               bias)


def _kernel_from_rpb(rpb: torch.Tensor | None, name: str) -> int:
    if not isinstance(rpb, torch.Tensor):
        raise ValueError(f"{name}: the four-argument form (query, key, rpb, dilation) reads kernel_size from rpb, "
                         "which is None; pass kernel_size")
    return (rpb.shape[-1] + 1) // 2


def _kernel_from_attn(attn: torch.Tensor, n: int, name: str) -> int:
    k = round(attn.shape[-1] ** (1.0 / n))
    if k**n != attn.shape[-1]:
        raise ValueError(f"{name}: cannot read kernel_size from attn.shape={tuple(attn.shape)} (last axis is not a "
                         f"{n}-th power); pass kernel_size")
    return k


def natten1dqkrpb(query: torch.Tensor, key: torch.Tensor, rpb: torch.Tensor | None, kernel_size: int,
                  dilation: int | None = None) -> torch.Tensor:
    """Legacy 1-D logits with optional rpb, heads-first; ``(query, key, rpb, dilation)`` is the 0.14.0-0.14.4 form."""
    if dilation is None:
        kernel_size, dilation = _kernel_from_rpb(rpb, "natten1dqkrpb"), kernel_size
    return _qk(1, query, key, kernel_size, dilation, None, False, rpb)


def natten2dqkrpb(query: torch.Tensor, key: torch.Tensor, rpb: torch.Tensor | None, kernel_size: int,
                  dilation: int | None = None) -> torch.Tensor:
    """Legacy 2-D logits with optional rpb, heads-first; ``(query, key, rpb, dilation)`` is the 0.14.0-0.14.4 form."""
    if dilation is None:
        kernel_size, dilation = _kernel_from_rpb(rpb, "natten2dqkrpb"), kernel_size
    return _qk(2, query, key, kernel_size, dilation, None, False, rpb)


def natten3dqkrpb(query: torch.Tensor, key: torch.Tensor, rpb: torch.Tensor | None, kernel_size_d: int,
                  kernel_size: int, dilation_d: int, dilation: int) -> torch.Tensor:
    """Legacy 3-D logits with optional rpb ``[H, 2k_d-1, 2k-1, 2k-1]``, heads-first."""
    return na3d_qk_with_bias(query, key, rpb, kernel_size_d, kernel_size, dilation_d, dilation)


def natten1dqk(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """Legacy 1-D logits without rpb."""
    return _qk(1, query, key, kernel_size, dilation, None, False, None)


def natten2dqk(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """Legacy 2-D logits without rpb."""
    return _qk(2, query, key, kernel_size, dilation, None, False, None)


def natten3dqk(query: torch.Tensor, key: torch.Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
               dilation: int) -> torch.Tensor:
    """Legacy 3-D logits without rpb."""
    return na3d_qk_with_bias(query, key, None, kernel_size_d, kernel_size, dilation_d, dilation)


def natten1dav(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int | None = None) -> torch.Tensor:
    """Legacy 1-D weighted sum, heads-first; ``(attn, value, dilation)`` is the 0.14.0-0.14.4 form."""
    if dilation is None:
        kernel_size, dilation = _kernel_from_attn(attn, 1, "natten1dav"), kernel_size
    return _av(1, attn, value, kernel_size, dilation, None, False)


def natten2dav(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int | None = None) -> torch.Tensor:
    """Legacy 2-D weighted sum, heads-first; ``(attn, value, dilation)`` is the 0.14.0-0.14.4 form."""
    if dilation is None:
        kernel_size, dilation = _kernel_from_attn(attn, 2, "natten2dav"), kernel_size
    return _av(2, attn, value, kernel_size, dilation, None, False)


def natten3dav(attn: torch.Tensor, value: torch.Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
               dilation: int) -> torch.Tensor:
    """Legacy 3-D weighted sum, heads-first."""
    return _av(3, attn, value, (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation), None,
               False)


def _fused(n: int, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
           additional_values) -> torch.Tensor:
    fn = getattr(ops, f"na{n}d")
    # NATTEN computes `scale or head_dim ** -0.5`: 0 means the default there.
    return fn(query, key, value, kernel_size, dilation=dilation, is_causal=is_causal, rpb=rpb,
              scale=scale or None, additional_keys=additional_keys, additional_values=additional_values)


def na1d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any = 1,
         is_causal: Any = False, rpb: torch.Tensor | None = None, scale: float | None = None,
         additional_keys: torch.Tensor | None = None, additional_values: torch.Tensor | None = None) -> torch.Tensor:
    """Fused 1-D attention, heads-last ``[B, L, H, D]``; extra tokens ``[B, n_extra, H, D]``."""
    return _fused(1, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values)


def na2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any = 1,
         is_causal: Any = False, rpb: torch.Tensor | None = None, scale: float | None = None,
         additional_keys: torch.Tensor | None = None, additional_values: torch.Tensor | None = None) -> torch.Tensor:
    """Fused 2-D attention, heads-last ``[B, X, Y, H, D]``."""
    return _fused(2, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values)


def na3d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any = 1,
         is_causal: Any = False, rpb: torch.Tensor | None = None, scale: float | None = None,
         additional_keys: torch.Tensor | None = None, additional_values: torch.Tensor | None = None) -> torch.Tensor:
    """Fused 3-D attention, heads-last ``[B, X, Y, Z, H, D]``."""
    return _fused(3, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values)
