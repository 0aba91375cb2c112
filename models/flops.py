"""Analytic multiply-accumulate (MAC) counts of the NAT-family models, as the official READMEs report "FLOPs".

Counting rules (fvcore's, with the official NA handles; docs/models.md):

* convolutions and linear layers: one MAC per weight use (biases are free);
* neighborhood attention over the (padded) map: ``heads * H * W * (head_dim * K^2 + K^2)`` for QK plus RPB and
  ``heads * H * W * head_dim * K^2`` for AV; global attention (ViT-rpb) the same with ``K^2`` replaced by ``N``;
* LayerNorm: 5 per element; activations, residual adds, layer scale, padding and pooling: free.

The count is read from the built model's modules (channels, heads, kernel sizes, dilations), so it follows any
constructor override; nothing is executed, so meta-device models work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging
from torch import nn

from .isotropic import IsotropicNAT, RelPosBlock
from .nat import NAT, ConvDownsampler, ConvTokenizer

__all__ = ["count_macs"]


# The helpers read the built modules duck-typed (attributes of timm's and our blocks), hence `Any` parameters.


def _norm(tokens: int, channels: int) -> int:
    return 5 * tokens * channels


def _block(block: Any, tokens: int, attended: int, window: int) -> int:
    """A pre-norm attention block whose qkv and attention run over `attended` tokens, each with `window` keys."""
    attn = block.attn
    heads, head_dim = attn.num_heads, attn.head_dim
    dim = heads * head_dim
    macs = 2 * _norm(tokens, dim)
    macs += attended * dim * 3 * dim
    macs += heads * attended * (head_dim * window + window) + heads * attended * head_dim * window  # QK+RPB, AV
    macs += tokens * dim * dim
    return macs + 2 * tokens * dim * block.mlp.fc1.out_features


def _na_block(block: Any, height: int, width: int) -> int:
    (k_h, k_w), (d_h, d_w) = block.attn.kernel_size, block.attn.dilation
    # The module pads small maps up to kernel * dilation before qkv and runs attention on the padded map.
    padded = max(height, k_h * d_h) * max(width, k_w * d_w)
    return _block(block, height * width, padded, k_h * k_w)


def _global_block(block: RelPosBlock, height: int, width: int) -> int:
    return _block(block, height * width, height * width, height * width)


def _conv(conv: Any, height: int, width: int) -> tuple[int, int, int]:
    """MACs and output size of a conv on a ``height x width`` input."""
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = conv.kernel_size, conv.stride, conv.padding
    out_h = (height + 2 * p_h - k_h) // s_h + 1
    out_w = (width + 2 * p_w - k_w) // s_w + 1
    macs = out_h * out_w * conv.out_channels * (conv.in_channels // conv.groups) * k_h * k_w
    return macs, out_h, out_w


def _stem(stem: Any, height: int, width: int) -> tuple[int, int, int]:
    if isinstance(stem, ConvTokenizer):
        macs = 0
        for conv in stem.proj:
            m, height, width = _conv(conv, height, width)
            macs += m
        # nn.Module.__getattr__ types submodules and buffers as Tensor | Module
        return macs + _norm(height * width, stem.proj[-1].out_channels), height, width  # type: ignore[arg-type]
    if isinstance(stem, PatchEmbed):
        p_h, p_w = stem.patch_size
        if stem.dynamic_img_pad:
            height, width = math.ceil(height / p_h) * p_h, math.ceil(width / p_w) * p_w
        macs, height, width = _conv(stem.proj, height, width)
        if not isinstance(stem.norm, nn.Identity):
            macs += _norm(height * width, stem.proj.out_channels)
        return macs, height, width
    raise TypeError(f"count_macs: unsupported patch embedding {type(stem).__name__}")


def _downsample(module: Any, height: int, width: int) -> tuple[int, int, int]:
    if isinstance(module, ConvDownsampler):
        macs, height, width = _conv(module.reduction, height, width)
        return macs + _norm(height * width, module.reduction.out_channels), height, width
    if isinstance(module, PatchMerging):
        height, width = math.ceil(height / 2), math.ceil(width / 2)
        tokens = height * width
        return _norm(tokens, 4 * module.dim) + tokens * 4 * module.dim * module.out_dim, height, width
    raise TypeError(f"count_macs: unsupported downsampler {type(module).__name__}")


def _head(model: Any, tokens: int) -> int:
    macs = _norm(tokens, model.num_features) if isinstance(model.norm, nn.LayerNorm) else 0
    if isinstance(model.head, nn.Linear):
        macs += model.head.in_features * model.head.out_features
    return macs


def count_macs(model: nn.Module, img_size: int | Sequence[int] = 224) -> int:
    """MACs of one forward pass of `model` on a ``1 x C x H x W`` image.

    Args:
        model: A NAT/DiNAT, DiNAT_s or isotropic model (may live on the meta device).
        img_size: ``S`` or ``(H, W)``.

    Returns:
        The MAC count (the READMEs' "FLOPs", e.g. about 4.32e9 for nat_tiny at 224).
    """
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    macs, height, width = _stem(model.patch_embed, height, width)
    if isinstance(model, NAT):
        for stage in model.stages:
            for block in stage.blocks:
                macs += _na_block(block, height, width)
            if stage.downsample is not None:
                m, height, width = _downsample(stage.downsample, height, width)
                macs += m
        return macs + _head(model, height * width)
    if isinstance(model, IsotropicNAT):
        for block in model.layers:
            macs += (
                _global_block(block, height, width)
                if isinstance(block, RelPosBlock)
                else _na_block(block, height, width)
            )
        return macs + _head(model, height * width)
    raise TypeError(f"count_macs: unsupported model {type(model).__name__}")
