"""Isotropic NAT, DiNAT and ViT-rpb (16x16 patches, 12 blocks at 14x14, fixed 224 input).

Paper: Dilated Neighborhood Attention Transformer, Hassani & Shi, 2022 - https://arxiv.org/abs/2209.15001
(isotropic ablation models). Names follow the official ``isotropic.py``: ``layers`` is an ``nn.Sequential`` of
blocks. ViT-rpb's attention holds the persistent buffer ``relative_position_index`` (the only buffer in any
official checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from ..ops.neighborhood.validation import check_bool, check_heads, check_rate, check_real
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from ._base import NATBase, check_int_sequence, check_model_args, pretrained_cfg, variant_args
from ._weights import StateDict, load_state_dict_overlay, local_weights
from .nat import NATBlock, drop_path_schedule

__all__ = ["IsotropicNAT", "RelPosAttention", "RelPosBlock", "checkpoint_filter_fn", "relative_position_index"]

IMG_SIZE = 224
PATCH_SIZE = 16
ATTENTIONS = ("na", "global")


def relative_position_index(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """``index[u, w] = (r_w - r_u + H - 1) * (2W - 1) + (c_w - c_u + W - 1)``: key-minus-query offsets, ``[N, N]``."""
    rows = torch.arange(height, device=device).repeat_interleave(width)  # [N], row of each token
    cols = torch.arange(width, device=device).repeat(height)  # [N], column of each token
    dr = rows[None, :] - rows[:, None] + height - 1  # [N_query, N_key]
    dc = cols[None, :] - cols[:, None] + width - 1
    return dr * (2 * width - 1) + dc


@torch.fx.wrap
def _checked_grid(x: torch.Tensor, owner: str, grid_size: tuple[int, int]) -> torch.Tensor:
    """`x` after checking that its map ``[B, H, W, C]`` is the attention's fixed grid."""
    if tuple(x.shape[1:3]) != tuple(grid_size):
        raise ValueError(f"{owner}: map must be {grid_size}, got {tuple(x.shape[1:3])}")
    return x


class RelPosAttention(nn.Module):
    """Global multi-head self-attention with a learned relative-position bias ``rpb [heads, 2H-1, 2W-1]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int] = (14, 14),
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        """
        Args:
            dim: Channels.
            num_heads: Attention heads; must divide `dim`.
            grid_size: The fixed token map ``(H, W)``.
            qkv_bias: Bias in the qkv projection.
            qk_scale: Logit scale; None means ``head_dim ** -0.5``.
            attn_drop: Dropout probability on the attention weights (training only).
            proj_drop: Dropout probability after the output projection.

        Raises:
            TypeError: An argument of the wrong type, named in the message.
            ValueError: An argument out of range, named in the message.
        """
        super().__init__()
        owner = type(self).__name__
        dim, num_heads = check_heads(owner, dim, num_heads)
        # length=2 is checked
        grid_size = tuple(check_int_sequence(owner, "grid_size", grid_size, length=2))  # type: ignore[assignment]
        check_bool(owner, "qkv_bias", qkv_bias)
        if qk_scale is not None:
            check_real(owner, "qk_scale", qk_scale)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5 if qk_scale is None else float(qk_scale)
        self.grid_size = grid_size
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * grid_size[0] - 1, 2 * grid_size[1] - 1))
        trunc_normal_(self.rpb, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(*grid_size), persistent=True)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = check_rate(owner, "attn_drop", attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(check_rate(owner, "proj_drop", proj_drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _checked_grid(x, type(self).__name__, self.grid_size)
        batch, height, width, dim = x.shape
        tokens = height * width
        # [B, N, 3, heads, hd] -> 3 x [B, heads, N, hd]
        q, k, v = (
            self.qkv(x.reshape(batch, tokens, dim))
            .view(batch, tokens, 3, self.num_heads, -1)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        # nn.Module.__getattr__ types submodules and buffers as Tensor | Module
        bias = self.rpb.flatten(1)[:, self.relative_position_index.view(-1)].view(1, self.num_heads, tokens, tokens)  # type: ignore[operator]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        out = out.transpose(1, 2).reshape(batch, height, width, dim)
        return self.proj_drop(self.proj(out))


class RelPosBlock(nn.Module):
    """The ViT-rpb block: pre-norm global attention with RPB and an MLP (no layer scale)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        check_rate("RelPosBlock", "drop_path", drop_path)
        self.norm1 = norm_layer(dim)
        self.attn = RelPosAttention(
            dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        # timm annotates a class here; any module factory works
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """The isotropic key work: a stored ViT-rpb ``relative_position_index`` must equal the one computed for the
    model's grid (it is a derived buffer; a different one means a different or corrupted file).

    Raises:
        ValueError: A stored index differs from the computed one.
    """
    for name, module in model.named_modules():
        key = f"{name}.relative_position_index"
        if isinstance(module, RelPosAttention) and key in state_dict:
            expected = relative_position_index(*module.grid_size)
            if not torch.equal(state_dict[key].to(torch.long).cpu(), expected):
                raise ValueError(f"checkpoint's {key} differs from the computed relative position index")
    return dict(state_dict)


class IsotropicNAT(NATBase):
    """NAT-iso / DiNAT-iso / ViT-rpb: 16x16 patch embedding + LayerNorm, 12 blocks on a fixed 14x14 map."""

    checkpoint_filter = staticmethod(checkpoint_filter_fn)

    def __init__(
        self,
        img_size: int | tuple[int, int] = IMG_SIZE,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        attention: str = "na",
        kernel_size: int = 7,
        dilations: int | Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        layer_scale: float | None = None,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
    ):
        """
        Args:
            img_size: Input size; only 224 (the map is fixed at 14x14).
            in_chans: Input image channels.
            num_classes: Classifier outputs; 0 replaces the head with Identity.
            global_pool: ``'avg'`` or ``''``.
            embed_dim: Channels.
            depth: Blocks.
            num_heads: Heads; must divide `embed_dim`.
            attention: ``'na'`` (neighborhood attention) or ``'global'`` (ViT-rpb).
            kernel_size: Neighborhood size (``'na'`` only).
            dilations: One dilation per block (or one int for all); None means 1 (``'na'`` only).
            mlp_ratio: MLP hidden width over channels.
            qkv_bias: Bias in the qkv projections.
            qk_scale: Logit scale override.
            drop_rate: Dropout before the head.
            proj_drop_rate: Dropout after attention/MLP projections.
            attn_drop_rate: Dropout on attention probabilities.
            drop_path_rate: Final stochastic-depth rate (linear schedule).
            layer_scale: Layer-scale init for NA blocks; None (no official isotropic model has it).
            norm_layer: Normalization layer.

        Raises:
            TypeError: An argument of the wrong type, named in the message.
            ValueError: An argument out of range, named in the message.
        """
        super().__init__()
        owner = type(self).__name__
        check_model_args(
            owner, in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, kernel_size=kernel_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            qk_scale=qk_scale, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate, layer_scale=layer_scale,
        )
        # two sides (checked below)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)  # type: ignore[assignment]
        if img_size != (IMG_SIZE, IMG_SIZE):
            raise ValueError(f"{owner}: img_size must be {IMG_SIZE} (the map is fixed at 14x14), got {img_size}")
        if attention not in ATTENTIONS:
            raise ValueError(f"{owner}: attention must be 'na' or 'global', got {attention!r}")
        if embed_dim % num_heads:
            raise ValueError(f"{owner}: num_heads={num_heads} must divide embed_dim={embed_dim}")
        if dilations is None or isinstance(dilations, int):
            dilations = [1 if dilations is None else dilations] * depth
        self.dilations = check_int_sequence(owner, "dilations", dilations, length=depth)
        self.in_chans = in_chans
        self.img_size = img_size
        self.attention = attention
        self.embed_dim = embed_dim
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=PATCH_SIZE,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            flatten=False,
            output_fmt="NHWC",
            strict_img_size=False,
        )
        self.pos_drop = nn.Dropout(p=proj_drop_rate)
        rates = drop_path_schedule(drop_path_rate, depth)
        common: dict[str, Any] = {
            "mlp_ratio": mlp_ratio,
            "qkv_bias": qkv_bias,
            "qk_scale": qk_scale,
            "proj_drop": proj_drop_rate,
            "attn_drop": attn_drop_rate,
            "norm_layer": norm_layer,
        }
        blocks: list[nn.Module]
        if attention == "na":
            blocks = [
                NATBlock(
                    embed_dim,
                    num_heads,
                    kernel_size=kernel_size,
                    dilation=self.dilations[j],
                    drop_path=rates[j],
                    layer_scale=layer_scale,
                    **common,
                )
                for j in range(depth)
            ]
        else:
            blocks = [RelPosBlock(embed_dim, num_heads, drop_path=rates[j], **common) for j in range(depth)]
        self.layers = nn.Sequential(*blocks)
        self.feature_info = [
            {"num_chs": embed_dim, "reduction": PATCH_SIZE, "module": f"layers.{j}"} for j in range(depth)
        ]
        self.norm = norm_layer(embed_dim)
        self._init_head(embed_dim, num_classes, global_pool, drop_rate)
        self.init_weights()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^patch_embed", "blocks": [(r"^layers\.(\d+)", None), (r"^norm", (99999,))]}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.patch_embed(self._check_input(x, self.img_size)))  # [B, 14, 14, E]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward that also returns block outputs (``[B, E, 14, 14]`` for NCHW); `indices` as in timm's ViT."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        x = self._embed(x)
        blocks = self.layers if torch.jit.is_scripting() or not stop_early else self.layers[: max_index + 1]
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x_inter)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, 224, 224]`` -> normalised ``[B, 14, 14, E]``."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.layers, x)
        else:
            x = self.layers(x)
        return self.norm(x)


def _create_isotropic(variant: str, pretrained: bool, model_args: Mapping[str, Any], **kwargs: Any) -> IsotropicNAT:
    return build_model_with_cfg(
        IsotropicNAT, variant, pretrained, pretrained_filter_fn=load_state_dict_overlay,
        feature_cfg={"out_indices": 3, "feature_cls": "getter"},
        **local_weights(variant, pretrained, variant_args(model_args, kwargs)),
    )


_URL = "https://shi-labs.com/projects/dinat/checkpoints/isotropic/"
_EMA_NOTE = ("Trained with EMA (decay 0.9998); whether the released file holds the EMA weights is unknown.",)


def _cfg(file: str, **kwargs: Any) -> dict[str, Any]:
    return pretrained_cfg(
        _URL + file, "patch_embed.proj", reduction=PATCH_SIZE, fixed_input_size=True, paper_ids="arXiv:2209.15001",
        paper_name="Dilated Neighborhood Attention Transformer", **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "nat_isotropic_small.in1k": _cfg("nat_isotropic_small_in1k_224.pth"),
        "dinat_isotropic_small.in1k": _cfg("dinat_isotropic_small_in1k_224.pth"),
        "vitrpb_small.in1k": _cfg("vitrpb_small_in1k_224.pth"),
        "nat_isotropic_base.in1k": _cfg("nat_isotropic_base_in1k_224.pth", notes=_EMA_NOTE),
        "dinat_isotropic_base.in1k": _cfg("dinat_isotropic_base_in1k_224.pth", notes=_EMA_NOTE),
        "vitrpb_base.in1k": _cfg("vitrpb_base_in1k_224.pth", notes=_EMA_NOTE),
    }
)

_SMALL = {"embed_dim": 384, "depth": 12, "num_heads": 12, "drop_path_rate": 0.1}
_BASE = {"embed_dim": 768, "depth": 12, "num_heads": 24, "drop_path_rate": 0.4}
_ALTERNATING = (1, 2)  # DiNAT-iso: dilation 1 in even blocks, 2 in odd blocks (cycled to the depth)


@register_model
def nat_isotropic_small(pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    """NAT-iso-Small (22M params, 4.3 GMACs)."""
    return _create_isotropic("nat_isotropic_small", pretrained, _SMALL, **kwargs)


@register_model
def dinat_isotropic_small(pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    """DiNAT-iso-Small (22M params, 4.3 GMACs): dilation 1 in even blocks, 2 in odd blocks."""
    args = dict(_SMALL, dilations=_ALTERNATING * 6)
    return _create_isotropic("dinat_isotropic_small", pretrained, args, **kwargs)


@register_model
def vitrpb_small(pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    """ViT-rpb-Small (22M params, 4.6 GMACs): global self-attention with relative-position bias."""
    return _create_isotropic("vitrpb_small", pretrained, dict(_SMALL, attention="global"), **kwargs)


@register_model
def nat_isotropic_base(pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    """NAT-iso-Base (86M params, 16.9 GMACs)."""
    return _create_isotropic("nat_isotropic_base", pretrained, _BASE, **kwargs)


@register_model
def dinat_isotropic_base(pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    """DiNAT-iso-Base (86M params, 16.9 GMACs): dilation alternating 1, 2."""
    args = dict(_BASE, dilations=_ALTERNATING * 6)
    return _create_isotropic("dinat_isotropic_base", pretrained, args, **kwargs)


@register_model
def vitrpb_base(pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    """ViT-rpb-Base (87M params, 17.5 GMACs)."""
    return _create_isotropic("vitrpb_base", pretrained, dict(_BASE, attention="global"), **kwargs)
