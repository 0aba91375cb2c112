"""DiNAT_s: the Swin-like DiNAT variant (4x4 patch embedding, Swin PatchMerging, mlp_ratio 4, no layer scale).

Paper: Dilated Neighborhood Attention Transformer, Hassani & Shi, 2022 - https://arxiv.org/abs/2209.15001

Names follow the official ``dinat_s.py`` (``layers.{i}.blocks.{j}``), so the released checkpoints load strictly.
Tokens are channels-last ``[B, H, W, C]`` between modules.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import nn

from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging

from ._helpers import build_with_weights, filter_checkpoint, pretrained_cfg
from .nat import DilationsArg, NATBase, fit_dilations

__all__ = ["DiNATs", "checkpoint_filter_fn"]

DILATIONS_S_TINY = ((1, 8), (1, 4), (1, 2) * 3, (1, 1))
DILATIONS_S_224 = ((1, 8), (1, 4), (1, 2) * 9, (1, 1))
DILATIONS_S_384 = ((1, 13), (1, 6), (1, 3) * 9, (1, 1))


def _patch_merging(dim: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm) -> nn.Module:
    # Swin's PatchMerging: pad odd sides, concat x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2],
    # LayerNorm(4C) before the bias-free Linear(4C -> 2C).
    return PatchMerging(dim, out_dim=2 * dim, norm_layer=norm_layer)


class DiNATs(NATBase):
    """DiNAT_s: 4x4 patch embedding, four NA stages (``layers``) with Swin patch merging, LayerNorm, mean pool."""

    stages_attr = "layers"

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        kernel_size: int = 7,
        dilations: DilationsArg = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        layer_scale: Optional[float] = None,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        clamp_dilation: bool = False,
    ):
        """
        Args:
            in_chans: Input image channels.
            num_classes: Classifier outputs; 0 replaces the head with Identity.
            global_pool: ``'avg'`` or ``''``.
            embed_dim: Channels of stage 0; stage ``i`` has ``embed_dim * 2**i``.
            depths: Blocks per stage.
            num_heads: Heads per stage.
            kernel_size: Neighborhood size.
            dilations: Per-block dilations, one list (or int) per stage; None means all 1.
            mlp_ratio: MLP hidden width over channels.
            qkv_bias: Bias in the qkv projections.
            qk_scale: Logit scale override.
            drop_rate: Dropout before the head.
            proj_drop_rate: Dropout after attention/MLP projections.
            attn_drop_rate: Dropout on attention probabilities.
            drop_path_rate: Final stochastic-depth rate (linear schedule over all blocks).
            layer_scale: Layer-scale init value; None (the official DiNAT_s never has it).
            norm_layer: Normalization layer.
            clamp_dilation: Clamp dilations to what each feature map allows at run time (off by default).
        """
        super().__init__()
        # Zero-pads the image bottom/right to a multiple of 4, then conv 4x4/4, BHWC output, LayerNorm.
        patch_embed = PatchEmbed(
            img_size=None,
            patch_size=4,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            flatten=False,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        self._build(
            patch_embed, _patch_merging, in_chans, num_classes, global_pool, embed_dim, depths, num_heads,
            kernel_size, dilations, mlp_ratio, qkv_bias, qk_scale, drop_rate, proj_drop_rate, attn_drop_rate,
            drop_path_rate, layer_scale, norm_layer, clamp_dilation,
        )


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """Official DiNAT_s ``.pth`` -> validated state dict (there is no HF port of DiNAT_s)."""
    return filter_checkpoint(state_dict, model)


def _build(variant: str, pretrained: bool, **kwargs: Any) -> DiNATs:
    return build_model_with_cfg(
        DiNATs,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _alt(name: str) -> List[str]:
    # classification/DiNAT.md links "_1k_" names where the code uses "_in1k_" (spec 2.4): tried after a failure.
    return [_URL + "dinat/checkpoints/imagenet1k/" + name]


def _create_dinat_s(variant: str, pretrained: bool = False, **kwargs: Any) -> DiNATs:
    return build_with_weights(_build, variant, pretrained, alternate_urls=ALTERNATE_URLS, **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return pretrained_cfg(
        url, "patch_embed.proj", paper_ids="arXiv:2209.15001", paper_name="Dilated Neighborhood Attention Transformer",
        **kwargs,
    )


_URL = "https://shi-labs.com/projects/"
ALTERNATE_URLS = {
    "dinat_s_tiny.in1k": _alt("dinat_s_tiny_1k_224.pth"),
    "dinat_s_small.in1k": _alt("dinat_s_small_1k_224.pth"),
    "dinat_s_base.in1k": _alt("dinat_s_base_1k_224.pth"),
    "dinat_s_large.in22k_ft_in1k": _alt("dinat_s_large_1k_224.pth"),
    "dinat_s_large_384.in22k_ft_in1k": _alt("dinat_s_large_1k_384.pth"),
}

default_cfgs = generate_default_cfgs(
    {
        "dinat_s_tiny.in1k": _cfg(_URL + "dinat/checkpoints/imagenet1k/dinat_s_tiny_in1k_224.pth"),
        "dinat_s_small.in1k": _cfg(_URL + "dinat/checkpoints/imagenet1k/dinat_s_small_in1k_224.pth"),
        "dinat_s_base.in1k": _cfg(_URL + "dinat/checkpoints/imagenet1k/dinat_s_base_in1k_224.pth"),
        "dinat_s_large.in22k_ft_in1k": _cfg(_URL + "dinat/checkpoints/imagenet1k/dinat_s_large_in1k_224.pth"),
        "dinat_s_large.in22k": _cfg(
            _URL + "dinat/checkpoints/imagenet22k/dinat_s_large_in22k_224.pth",
            num_classes=21841,
            notes=("ImageNet-22K head: the class count is read from the checkpoint's head.weight (probably 21841).",),
        ),
        "dinat_s_large_384.in22k_ft_in1k": _cfg(
            _URL + "dinat/checkpoints/imagenet1k/dinat_s_large_in1k_384.pth", input_size=(3, 384, 384), crop_pct=1.0
        ),
    }
)


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Tiny (28M params, 4.5 GMACs at 224)."""
    model_args = dict(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        drop_path_rate=0.2,
        dilations=fit_dilations(DILATIONS_S_TINY, kwargs.get("depths")),
    )
    return _create_dinat_s("dinat_s_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Small (50M params, 8.7 GMACs at 224)."""
    model_args = dict(
        embed_dim=96,
        depths=(2, 2, 18, 2),
        num_heads=(3, 6, 12, 24),
        drop_path_rate=0.3,
        dilations=fit_dilations(DILATIONS_S_224, kwargs.get("depths")),
    )
    return _create_dinat_s("dinat_s_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Base (88M params, 15.4 GMACs at 224)."""
    model_args = dict(
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        drop_path_rate=0.5,
        dilations=fit_dilations(DILATIONS_S_224, kwargs.get("depths")),
    )
    return _create_dinat_s("dinat_s_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Large at 224 (197M params, 34.5 GMACs); heads 6/12/24/48 as the checkpoints need (spec 1.4)."""
    drop_path = 0.2 if kwargs.get("pretrained_cfg") == "in22k" else 0.35
    model_args = dict(
        embed_dim=192,
        depths=(2, 2, 18, 2),
        num_heads=(6, 12, 24, 48),
        drop_path_rate=drop_path,
        dilations=fit_dilations(DILATIONS_S_224, kwargs.get("depths")),
    )
    return _create_dinat_s("dinat_s_large", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Large at 384 (197M params, 101.5 GMACs) with the 384 dilation lists."""
    model_args = dict(
        embed_dim=192,
        depths=(2, 2, 18, 2),
        num_heads=(6, 12, 24, 48),
        drop_path_rate=0.35,
        dilations=fit_dilations(DILATIONS_S_384, kwargs.get("depths")),
    )
    return _create_dinat_s("dinat_s_large_384", pretrained=pretrained, **dict(model_args, **kwargs))
