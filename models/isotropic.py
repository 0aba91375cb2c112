"""Isotropic NAT, DiNAT and ViT-rpb (16x16 patches, 12 blocks at 14x14, fixed 224 input).

Paper: Dilated Neighborhood Attention Transformer, Hassani & Shi, 2022 - https://arxiv.org/abs/2209.15001
(isotropic ablation models). Names follow the official ``isotropic.py``: ``layers`` is an ``nn.Sequential`` of
blocks. ViT-rpb's attention holds the persistent buffer ``relative_position_index`` (the only buffer in any
official checkpoint).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from ._helpers import build_with_weights, filter_checkpoint, pretrained_cfg
from .nat import NATBlock, drop_path_schedule

__all__ = ["IsotropicNAT", "RelPosAttention", "RelPosBlock", "relative_position_index", "checkpoint_filter_fn"]

IMG_SIZE = 224
PATCH_SIZE = 16


def relative_position_index(height: int, width: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``index[u, w] = (r_w - r_u + H - 1) * (2W - 1) + (c_w - c_u + W - 1)``: key-minus-query offsets, ``[N, N]``."""
    rows = torch.arange(height, device=device).repeat_interleave(width)  # [N], row of each token
    cols = torch.arange(width, device=device).repeat(height)  # [N], column of each token
    dr = rows[None, :] - rows[:, None] + height - 1  # [N_query, N_key]
    dc = cols[None, :] - cols[:, None] + width - 1
    return dr * (2 * width - 1) + dc


class RelPosAttention(nn.Module):
    """Global multi-head self-attention with a learned relative-position bias ``rpb [heads, 2H-1, 2W-1]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: Tuple[int, int] = (14, 14),
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"RelPosAttention: dim must be divisible by num_heads, got {dim} and {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5 if qk_scale is None else qk_scale
        self.grid_size = tuple(grid_size)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * grid_size[0] - 1, 2 * grid_size[1] - 1))
        trunc_normal_(self.rpb, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(*grid_size), persistent=True)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        if (height, width) != self.grid_size:
            raise ValueError(f"RelPosAttention: map must be {self.grid_size}, got {(height, width)}")
        tokens = height * width
        # [B, N, 3, heads, hd] -> 3 x [B, heads, N, hd]
        q, k, v = (
            self.qkv(x.reshape(batch, tokens, dim))
            .view(batch, tokens, 3, self.num_heads, -1)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        bias = self.rpb.flatten(1)[:, self.relative_position_index.view(-1)].view(1, self.num_heads, tokens, tokens)
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
        qk_scale: Optional[float] = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = RelPosAttention(
            dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class IsotropicNAT(nn.Module):
    """NAT-iso / DiNAT-iso / ViT-rpb: 16x16 patch embedding + LayerNorm, 12 blocks on a fixed 14x14 map."""

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = IMG_SIZE,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        attention: str = "na",
        kernel_size: int = 7,
        dilations: Optional[Union[int, Sequence[int]]] = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        layer_scale: Optional[float] = None,
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
            num_heads: Heads.
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
        """
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size != (IMG_SIZE, IMG_SIZE):
            raise ValueError(f"img_size must be {IMG_SIZE} (isotropic models run on a fixed 14x14 map), got {img_size}")
        if global_pool not in ("", "avg"):
            raise ValueError(f"global_pool must be '' or 'avg', got {global_pool!r}")
        if attention not in ("na", "global"):
            raise ValueError(f"attention must be 'na' or 'global', got {attention!r}")
        if dilations is None or isinstance(dilations, int):
            dilations = [1 if dilations is None else dilations] * depth
        if len(dilations) != depth:
            raise ValueError(f"dilations must have {depth} entries (one per block), got {len(dilations)}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.img_size = img_size
        self.attention = attention
        self.dilations = list(dilations)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.output_fmt = "NHWC"
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
        common = dict(
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate,
            norm_layer=norm_layer,
        )
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
        reduction = PATCH_SIZE
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"layers.{j}") for j in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if any(p.is_meta for p in m.parameters(recurse=False)):
            return  # shape-only model: random init is meaningless there and slow on the meta device
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self, include_rpb: bool = True) -> Set[str]:
        """Biases, norms, layer-scale gammas and (by default) ``rpb``; see ``NATBase.no_weight_decay``."""
        names = set()
        for name, param in self.named_parameters():
            is_rpb = name.endswith("attn.rpb")
            if (is_rpb and include_rpb) or (not is_rpb and param.ndim <= 1):
                names.add(name)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("", "avg"):
                raise ValueError(f"global_pool must be '' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"{type(self).__name__}: x must be [B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}] "
                f"(fixed input size), got {tuple(x.shape)}"
            )
        return self.pos_drop(self.patch_embed(x))  # [B, 14, 14, E]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
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
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
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

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Validates an official isotropic checkpoint; for ViT-rpb also checks the stored ``relative_position_index``.

    Raises:
        ValueError: On missing/unexpected/mis-shaped keys, or a stored index that differs from the computed one.
    """
    sd = filter_checkpoint(state_dict, model)
    for name, module in model.named_modules():
        if isinstance(module, RelPosAttention):
            key = f"{name}.relative_position_index"
            expected = relative_position_index(*module.grid_size)
            if not torch.equal(sd[key].to(torch.long).cpu(), expected):
                raise ValueError(f"checkpoint's {key} differs from the computed relative position index")
    return sd


def _build(variant: str, pretrained: bool, **kwargs: Any) -> IsotropicNAT:
    return build_model_with_cfg(
        IsotropicNAT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


def _create_isotropic(variant: str, pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    return build_with_weights(_build, variant, pretrained, **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return pretrained_cfg(url, "patch_embed.proj", fixed_input_size=True, paper_ids="arXiv:2209.15001",
                          paper_name="Dilated Neighborhood Attention Transformer", **kwargs)


_URL = "https://shi-labs.com/projects/dinat/checkpoints/isotropic/"
_EMA_NOTE = ("Trained with EMA (decay 0.9998); whether the released file holds the EMA weights is unknown.",)

default_cfgs = generate_default_cfgs(
    {
        "nat_isotropic_small.in1k": _cfg(_URL + "nat_isotropic_small_in1k_224.pth"),
        "dinat_isotropic_small.in1k": _cfg(_URL + "dinat_isotropic_small_in1k_224.pth"),
        "vitrpb_small.in1k": _cfg(_URL + "vitrpb_small_in1k_224.pth"),
        "nat_isotropic_base.in1k": _cfg(_URL + "nat_isotropic_base_in1k_224.pth", notes=_EMA_NOTE),
        "dinat_isotropic_base.in1k": _cfg(_URL + "dinat_isotropic_base_in1k_224.pth", notes=_EMA_NOTE),
        "vitrpb_base.in1k": _cfg(_URL + "vitrpb_base_in1k_224.pth", notes=_EMA_NOTE),
    }
)


def _alternating(kwargs: Dict[str, Any]) -> Tuple[int, ...]:
    return tuple(1 + j % 2 for j in range(kwargs.get("depth", 12)))


@register_model
def nat_isotropic_small(pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    """NAT-iso-Small (22M params, 4.3 GMACs)."""
    model_args = dict(embed_dim=384, depth=12, num_heads=12, drop_path_rate=0.1)
    return _create_isotropic("nat_isotropic_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_isotropic_small(pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    """DiNAT-iso-Small (22M params, 4.3 GMACs): dilation 1 in even blocks, 2 in odd blocks."""
    model_args = dict(embed_dim=384, depth=12, num_heads=12, drop_path_rate=0.1, dilations=_alternating(kwargs))
    return _create_isotropic("dinat_isotropic_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vitrpb_small(pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    """ViT-rpb-Small (22M params, 4.6 GMACs): global self-attention with relative-position bias."""
    model_args = dict(embed_dim=384, depth=12, num_heads=12, drop_path_rate=0.1, attention="global")
    return _create_isotropic("vitrpb_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_isotropic_base(pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    """NAT-iso-Base (86M params, 16.9 GMACs)."""
    model_args = dict(embed_dim=768, depth=12, num_heads=24, drop_path_rate=0.4)
    return _create_isotropic("nat_isotropic_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_isotropic_base(pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    """DiNAT-iso-Base (86M params, 16.9 GMACs): dilation alternating 1, 2."""
    model_args = dict(embed_dim=768, depth=12, num_heads=24, drop_path_rate=0.4, dilations=_alternating(kwargs))
    return _create_isotropic("dinat_isotropic_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vitrpb_base(pretrained: bool = False, **kwargs: Any) -> IsotropicNAT:
    """ViT-rpb-Base (87M params, 17.5 GMACs)."""
    model_args = dict(embed_dim=768, depth=12, num_heads=24, drop_path_rate=0.4, attention="global")
    return _create_isotropic("vitrpb_base", pretrained=pretrained, **dict(model_args, **kwargs))
