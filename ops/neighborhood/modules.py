"""Neighborhood-attention modules with the parameter names of the official NAT/DiNAT checkpoints.

The shape-dependent steps of the forward (input checks, the pad-then-crop rule, the op itself) live in
``torch.fx.wrap``-ed functions, so symbolic tracing (timm's FX feature extraction, torchvision's
``create_feature_extractor``) records each as one call instead of failing on control flow over tensor sizes; eager
and compiled execution run the same code either way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .functional import neighborhood_attention
from .validation import (
    MAX_SCALE,
    BoolOrTuple,
    IntOrTuple,
    check_bool,
    check_heads,
    check_problem,
    check_rate,
    check_real,
    check_rpb_flag,
    check_window_args,
)

__all__ = [
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
]


@torch.fx.wrap
def _window_dilation(
    x: torch.Tensor, owner: str, n: int, dim: int, kernel_size: tuple[int, ...], stride: tuple[int, ...],
    dilation: tuple[int, ...], override: Any, is_causal: tuple[bool, ...],
) -> tuple[int, ...]:
    """Checks `x` ``[B, *S, dim]`` and returns the dilation of this call (the module's, or a validated override)."""
    if x.dim() != n + 2 or x.shape[-1] != dim:
        raise ValueError(f"{owner}: x must be [B, *spatial({n}), dim={dim}], got x.shape={tuple(x.shape)}")
    if override is None:
        return dilation
    return check_window_args(owner, n, kernel_size, stride, override, is_causal)[2]


@torch.fx.wrap
def _pad_to_window(x: torch.Tensor, kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """Zero-pads each spatial axis shorter than ``kernel_size * dilation`` at its end (channels stay unpadded)."""
    pad = [max(k * d - length, 0) for k, d, length in zip(kernel_size, dilation, x.shape[1:-1])]
    if not any(pad):
        return x
    # F.pad lists (before, after) pairs from the last dim backwards.
    return F.pad(x, [0, 0] + [p for amount in reversed(pad) for p in (0, amount)])


@torch.fx.wrap
def _attend(
    qkv: torch.Tensor, x: torch.Tensor, rpb: torch.Tensor | None, owner: str, n: int, num_heads: int,
    kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...], is_causal: tuple[bool, ...],
    scale: float, dropout_p: float,
) -> torch.Tensor:
    """Attention over the (possibly padded) ``qkv [B, *S', 3 * dim]``, cropped to `x`'s spatial size:
    ``[B, *S, dim]``."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).unbind(dim=-3)  # 3 x [B, *S', heads, head_dim]
    problem = check_problem(owner, n, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, None)
    out = neighborhood_attention(problem, q, k, v, rpb, dropout_p=dropout_p)
    spatial = x.shape[1:-1]
    if tuple(out.shape[1:-2]) != tuple(spatial):
        crop = (slice(None), *(slice(0, length) for length in spatial))  # [B, *spatial, ...] of the unpadded map
        out = out[crop]
    return out.flatten(-2)


class _NeighborhoodAttentionNd(nn.Module):
    """Multi-head neighborhood attention on channels-last ``[B, *S, C]`` inputs.

    Inputs shorter than ``kernel_size * dilation`` on an axis are zero-padded at the end of that axis before
    ``qkv`` and the attention output is cropped back before ``proj`` (the NATTEN <= 0.15 behaviour the official
    checkpoints were trained with).
    """

    n: int = 0

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: IntOrTuple,
        dilation: IntOrTuple = 1,
        stride: IntOrTuple = 1,
        is_causal: BoolOrTuple = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        rel_pos_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: Channels (``num_heads * head_dim``).
            num_heads: Attention heads; must divide `dim`.
            kernel_size: Window size per axis (``>= 2``).
            dilation: Window dilation per axis (``>= 1``).
            stride: Query-block stride per axis (``1 <= stride <= kernel_size``).
            is_causal: Causal masking per axis.
            qkv_bias: Bias in the qkv projection.
            qk_scale: Logit scale; None means ``head_dim ** -0.5``.
            rel_pos_bias: Learn a relative positional bias ``rpb [heads, 2k-1, ...]`` (stride 1 only).
            attn_drop: Dropout probability on the attention weights (training only).
            proj_drop: Dropout probability after the output projection.

        Raises:
            TypeError: An argument of the wrong type (e.g. a float `num_heads`).
            ValueError: An argument out of range, named in the message.
        """
        super().__init__()
        name = type(self).__name__
        dim, num_heads = check_heads(name, dim, num_heads)
        check_bool(name, "qkv_bias", qkv_bias)
        check_bool(name, "rel_pos_bias", rel_pos_bias)
        if qk_scale is not None and abs(check_real(name, "qk_scale", qk_scale)) > MAX_SCALE:
            raise ValueError(f"{name}: qk_scale must satisfy |qk_scale| <= {MAX_SCALE:g} (larger logits overflow "
                             f"float32 and make the output NaN), got {qk_scale}")
        ks, st, dil, causal = check_window_args(name, self.n, kernel_size, stride, dilation, is_causal)
        check_rpb_flag(name, rel_pos_bias, st)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size, self.stride, self.dilation, self.is_causal = ks, st, dil, causal
        self.scale = self.head_dim**-0.5 if qk_scale is None else float(qk_scale)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in ks)))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop = check_rate(name, "attn_drop", attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(check_rate(name, "proj_drop", proj_drop))

    def forward(self, x: torch.Tensor, dilation: IntOrTuple | None = None) -> torch.Tensor:
        """Attention over `x` ``[B, *S, dim]``.

        Args:
            x: Channels-last input.
            dilation: Overrides the module's dilation for this call (e.g. clamped to a small feature map).
        """
        owner = type(self).__name__
        dilation = _window_dilation(
            x, owner, self.n, self.dim, self.kernel_size, self.stride, self.dilation, dilation, self.is_causal
        )
        qkv = self.qkv(_pad_to_window(x, self.kernel_size, dilation))
        out = _attend(
            qkv, x, self.rpb, owner, self.n, self.num_heads, self.kernel_size, self.stride, dilation, self.is_causal,
            self.scale, self.attn_drop if self.training else 0.0,
        )
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}, "
            f"rel_pos_bias={self.rpb is not None}"
        )


class NeighborhoodAttention1D(_NeighborhoodAttentionNd):
    """Neighborhood attention over ``[B, L, C]``."""

    n = 1


class NeighborhoodAttention2D(_NeighborhoodAttentionNd):
    """Neighborhood attention over ``[B, H, W, C]`` (the NAT/DiNAT layer)."""

    n = 2


class NeighborhoodAttention3D(_NeighborhoodAttentionNd):
    """Neighborhood attention over ``[B, T, H, W, C]``."""

    n = 3
