"""Neighborhood-attention modules with the parameter names of the official NAT/DiNAT checkpoints."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .functional import _run
from .reference import na_reference
from .validation import BoolOrTuple, IntOrTuple, check_problem, check_rpb_flag, check_window_args


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
        qk_scale: Optional[float] = None,
        rel_pos_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"{name}: dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        ks, st, dil, causal = check_window_args(name, self.n, kernel_size, stride, dilation, is_causal)
        check_rpb_flag(name, rel_pos_bias, st)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size, self.stride, self.dilation, self.is_causal = ks, st, dil, causal
        self.scale = self.head_dim**-0.5 if qk_scale is None else qk_scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in ks)))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, dilation: Optional[IntOrTuple] = None) -> torch.Tensor:
        """Attention over `x` ``[B, *S, dim]``.

        Args:
            x: Channels-last input.
            dilation: Overrides the module's dilation for this call (e.g. clamped to a small feature map).
        """
        name = type(self).__name__
        if x.dim() != self.n + 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{name}: x must be [B, *spatial({self.n}), dim={self.dim}], got x.shape={tuple(x.shape)}"
            )
        if dilation is None:
            dilation = self.dilation
        else:
            dilation = check_window_args(name, self.n, self.kernel_size, self.stride, dilation, self.is_causal)[2]
        spatial = x.shape[1:-1]
        pad = [max(k * d - length, 0) for k, d, length in zip(self.kernel_size, dilation, spatial)]
        if any(pad):
            # F.pad lists (before, after) pairs from the last dim backwards; channels come last and stay unpadded.
            x = F.pad(x, [0, 0] + [p for amount in reversed(pad) for p in (0, amount)])
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.unbind(dim=-3)
        problem = check_problem(
            name, self.n, q, k, v, self.kernel_size, self.stride, dilation, self.is_causal, self.scale, self.rpb, None
        )
        if self.training and self.attn_drop > 0.0:
            out, _ = na_reference(problem, q, k, v, self.rpb, dropout_p=self.attn_drop, need_lse=False)
        else:
            out = _run(problem, q, k, v, self.rpb, False, None)
        if any(pad):
            out = out[(slice(None), *(slice(0, length) for length in spatial))]
        out = self.proj(out.flatten(-2))
        return self.proj_drop(out)

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
