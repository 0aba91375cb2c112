"""NATTEN's modules ``NeighborhoodAttention1D/2D/3D`` on natzoo's op, with NATTEN's constructor arguments and
state-dict names (``qkv``, ``rpb``, ``proj``).

Accepted arguments: NATTEN 0.17's ``(dim, num_heads, kernel_size, dilation=1, is_causal=False, rel_pos_bias=False,
qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0)``, plus the 0.14/0.15 keyword ``bias`` (the old name of
``rel_pos_bias``) and, in 3-D, ``kernel_size_d`` and ``dilation_d``. ``qk_scale`` of 0 or None means
``head_dim ** -0.5``, as in NATTEN. The default is NATTEN 0.17's (no rpb): code written for 0.14/0.15 that relied on
``bias=True`` being the default must pass it (a checkpoint with ``rpb`` keys then fails a strict load instead of
loading silently without them). Inputs smaller than ``kernel_size * dilation`` are padded and cropped, the
NATTEN <= 0.15 behaviour (0.17 raised instead). The attention-dropout rate is ``attn_drop_rate`` (as in NATTEN) and
``attn_drop`` (a float in natzoo, an ``nn.Dropout`` in NATTEN; neither has state-dict entries).
"""

from __future__ import annotations

from typing import Any


from natzoo.ops.neighborhood.modules import _NeighborhoodAttentionNd

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _CompatNd(_NeighborhoodAttentionNd):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: Any,
        dilation: Any = 1,
        is_causal: Any = False,
        rel_pos_bias: bool | None = None,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        bias: bool | None = None,
    ) -> None:
        if rel_pos_bias is not None and bias is not None and rel_pos_bias != bias:
            raise ValueError(f"{type(self).__name__}: rel_pos_bias={rel_pos_bias} and bias={bias} disagree (bias is "
                             "NATTEN 0.14/0.15's name for rel_pos_bias); pass one")
        use_rpb = rel_pos_bias if rel_pos_bias is not None else bool(bias)
        super().__init__(dim, num_heads, kernel_size, dilation=dilation, is_causal=is_causal, qkv_bias=qkv_bias,
                         qk_scale=qk_scale or None, rel_pos_bias=use_rpb, attn_drop=attn_drop, proj_drop=proj_drop)
        # natzoo keeps the dropout rate in `attn_drop` (NATTEN had an nn.Dropout there: no state-dict entries).
        self.attn_drop_rate = self.attn_drop


class NeighborhoodAttention1D(_CompatNd):
    """NATTEN's 1-D module over ``[B, L, dim]``."""

    n = 1


class NeighborhoodAttention2D(_CompatNd):
    """NATTEN's 2-D module over ``[B, H, W, dim]`` (the NAT/DiNAT layer)."""

    n = 2


class NeighborhoodAttention3D(_CompatNd):
    """NATTEN's 3-D module over ``[B, D, H, W, dim]``; ``kernel_size_d``/``dilation_d`` are NATTEN 0.15's depth
    arguments."""

    n = 3

    def __init__(self, dim: int, num_heads: int, kernel_size: Any, dilation: Any = 1, is_causal: Any = False,
                 rel_pos_bias: bool | None = None, qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, *, bias: bool | None = None,
                 kernel_size_d: int | None = None, dilation_d: int | None = None) -> None:
        if kernel_size_d is not None:
            kernel_size = (kernel_size_d, kernel_size, kernel_size)
        if dilation_d is not None:
            dilation = (dilation_d, dilation, dilation)
        super().__init__(dim, num_heads, kernel_size, dilation, is_causal, rel_pos_bias, qkv_bias, qk_scale,
                         attn_drop, proj_drop, bias=bias)
