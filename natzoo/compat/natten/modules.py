"""NATTEN's modules ``NeighborhoodAttention1D/2D/3D`` on natzoo's op, with NATTEN's constructor arguments and
state-dict names (``qkv``, ``rpb``, ``proj``).

Accepted arguments: NATTEN 0.17's ``(dim, num_heads, kernel_size, dilation=1, is_causal=False, rel_pos_bias=False,
qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0, use_experimental_ops=False)``, plus the 0.14/0.15
keyword ``bias`` (the old name of ``rel_pos_bias``) and, in 3-D, 0.15's ``kernel_size_d`` and ``dilation_d``. As in
NATTEN, ``dilation=None`` means 1 (0.14-0.15: ``dilation or 1``; 0.17: None is read as 1), ``is_causal=None``
means False, ``qk_scale`` of 0 or None means ``head_dim ** -0.5``, and in 3-D ``kernel_size_d=None``/
``dilation_d=None`` take the spatial values. The default is NATTEN 0.17's (no rpb): code written for 0.14/0.15 that
relied on ``bias=True`` being the default must pass it (a checkpoint with ``rpb`` keys then fails a strict load
instead of loading silently without them). Inputs smaller than ``kernel_size * dilation`` are padded and cropped, the
NATTEN <= 0.15 behaviour (0.17 raised instead). ``use_experimental_ops`` (NATTEN's torch.compile-able ops) is
accepted and has no effect: natzoo's op compiles either way. The attention-dropout rate is ``attn_drop_rate`` (as in
NATTEN) and ``attn_drop`` (a float in natzoo, an ``nn.Dropout`` in NATTEN; neither has state-dict entries).

``NeighborhoodAttention`` is the 2-D module of NATTEN 0.14.0-0.14.4: ``(dim, kernel_size, num_heads, qkv_bias=True,
qk_scale=None, attn_drop=0.0, proj_drop=0.0, dilation=None)``, always with rpb.
"""

from __future__ import annotations

from typing import Any

from natzoo.ops.neighborhood.modules import _NeighborhoodAttentionNd
from natzoo.ops.neighborhood.validation import check_bool

__all__ = ["NeighborhoodAttention", "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _CompatNd(_NeighborhoodAttentionNd):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: Any,
        dilation: Any = 1,
        is_causal: Any = False,
        rel_pos_bias: bool | None = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        use_experimental_ops: bool = False,
        *,
        bias: bool | None = None,
    ) -> None:
        name = type(self).__name__
        # NATTEN tested `if rel_pos_bias:`, so None reads as False there.
        rel_pos_bias = False if rel_pos_bias is None else rel_pos_bias
        check_bool(name, "rel_pos_bias", rel_pos_bias)
        check_bool(name, "use_experimental_ops", use_experimental_ops)
        if bias is not None:
            check_bool(name, "bias", bias)
            if rel_pos_bias and not bias:
                raise ValueError(f"{name}: rel_pos_bias=True and bias=False disagree (bias is NATTEN 0.14/0.15's "
                                 "name for rel_pos_bias); pass one")
        super().__init__(dim, num_heads, kernel_size, dilation=1 if dilation is None else dilation,
                         is_causal=False if is_causal is None else is_causal, qkv_bias=qkv_bias,
                         qk_scale=qk_scale or None, rel_pos_bias=rel_pos_bias or bool(bias), attn_drop=attn_drop,
                         proj_drop=proj_drop)
        # natzoo keeps the dropout rate in `attn_drop` (NATTEN had an nn.Dropout there: no state-dict entries).
        self.attn_drop_rate = self.attn_drop
        self.use_experimental_ops = use_experimental_ops


class NeighborhoodAttention1D(_CompatNd):
    """NATTEN's 1-D module over ``[B, L, dim]``."""

    n = 1


class NeighborhoodAttention2D(_CompatNd):
    """NATTEN's 2-D module over ``[B, H, W, dim]`` (the NAT/DiNAT layer)."""

    n = 2


class NeighborhoodAttention3D(_CompatNd):
    """NATTEN's 3-D module over ``[B, D, H, W, dim]``; ``kernel_size_d``/``dilation_d`` are NATTEN 0.15's depth
    arguments (keywords here: 0.15 had them between ``kernel_size`` and ``bias``, where 0.17 has ``dilation`` and
    ``is_causal``)."""

    n = 3

    def __init__(self, dim: int, num_heads: int, kernel_size: Any, dilation: Any = 1, is_causal: Any = False,
                 rel_pos_bias: bool | None = False, qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, use_experimental_ops: bool = False, *,
                 bias: bool | None = None, kernel_size_d: int | None = None,
                 dilation_d: int | None = None) -> None:
        dilation = 1 if dilation is None else dilation
        for arg, value, depth in (("kernel_size", kernel_size, kernel_size_d), ("dilation", dilation, dilation_d)):
            if depth is not None and not isinstance(value, int):
                raise ValueError(f"NeighborhoodAttention3D: {arg}_d={depth} needs an int {arg} (NATTEN 0.15's form: "
                                 f"{arg}_d for depth, {arg} for height and width), got {arg}={value!r}")
        if kernel_size_d is not None:
            kernel_size = (kernel_size_d, kernel_size, kernel_size)
        if dilation_d is not None:
            dilation = (dilation_d, dilation, dilation)
        super().__init__(dim, num_heads, kernel_size, dilation, is_causal, rel_pos_bias, qkv_bias, qk_scale,
                         attn_drop, proj_drop, use_experimental_ops, bias=bias)


class NeighborhoodAttention(NeighborhoodAttention2D):
    """NATTEN 0.14.0-0.14.4's 2-D module (deprecated there in favour of ``NeighborhoodAttention2D``): its own
    argument order, and always a relative positional bias."""

    def __init__(self, dim: int, kernel_size: Any, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 dilation: Any = None) -> None:
        super().__init__(dim, num_heads, kernel_size, dilation=dilation, rel_pos_bias=True, qkv_bias=qkv_bias,
                         qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop)
