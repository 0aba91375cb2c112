"""DiNAT_s: the Swin-like DiNAT variant (4x4 patch embedding, Swin PatchMerging, mlp_ratio 4, no layer scale).

Paper: Dilated Neighborhood Attention Transformer, Hassani & Shi, 2022 - https://arxiv.org/abs/2209.15001

Names follow the official ``dinat_s.py`` (``layers.{i}.blocks.{j}``), so the released checkpoints load strictly
and unchanged: the family has no key work of its own (there is no HF port of DiNAT_s). Tokens are channels-last
``[B, H, W, C]`` between modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from timm.layers import PatchEmbed
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging
from torch import nn

from ._base import pretrained_cfg
from .nat import IN22K_NOTE, NAT, DilationsArg, _create_hierarchical

__all__ = ["DiNATs"]

DILATIONS_S_TINY = ((1, 8), (1, 4), (1, 2) * 3, (1, 1))
DILATIONS_S_224 = ((1, 8), (1, 4), (1, 2) * 9, (1, 1))
DILATIONS_S_384 = ((1, 13), (1, 6), (1, 3) * 9, (1, 1))


def _patch_embed(in_chans: int, embed_dim: int, norm_layer: Callable[..., nn.Module]) -> nn.Module:
    # Zero-pads the image bottom/right to a multiple of 4, then conv 4x4/4, BHWC output, LayerNorm.
    return PatchEmbed(
        img_size=None, patch_size=4, in_chans=in_chans, embed_dim=embed_dim, norm_layer=norm_layer, flatten=False,
        output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True,
    )


def _patch_merging(dim: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm) -> nn.Module:
    # Swin's PatchMerging: pad odd sides, concat x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2],
    # LayerNorm(4C) before the bias-free Linear(4C -> 2C).
    # timm annotates a class here; any module factory works
    return PatchMerging(dim, out_dim=2 * dim, norm_layer=norm_layer)  # type: ignore[arg-type]


class DiNATs(NAT):
    """DiNAT_s: the NAT trunk with a 4x4 patch embedding, Swin patch merging and stages named ``layers``.

    Arguments are those of :class:`natzoo.models.NAT` with DiNAT_s defaults (``embed_dim=96``, ``depths=(2, 2,
    6, 2)``, ``num_heads=(3, 6, 12, 24)``, ``mlp_ratio=4``); the stem and downsampler are fixed.
    """

    stages_attr = "layers"
    # DiNAT_s checkpoints need no key work
    checkpoint_filter = None  # type: ignore[assignment]

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        dilations: DilationsArg = None,
        mlp_ratio: float = 4.0,
        **kwargs: Any,
    ):
        super().__init__(
            embed_dim=embed_dim, depths=depths, num_heads=num_heads, dilations=dilations, mlp_ratio=mlp_ratio,
            stem_layer=_patch_embed, downsample_layer=_patch_merging, **kwargs,
        )


def _dinat_s_cfg(path: str, **kwargs: Any) -> dict[str, Any]:
    return pretrained_cfg(
        _URL + path, "patch_embed.proj", reduction=32, paper_ids="arXiv:2209.15001",
        paper_name="Dilated Neighborhood Attention Transformer", **kwargs,
    )


_URL = "https://shi-labs.com/projects/dinat/checkpoints/"
# The official DiNAT.md links the IN-1K files with "_1k_" where the code uses "_in1k_": tried after a failure.
ALTERNATE_URLS = {
    f"{name}.{tag}": [_URL + f"imagenet1k/{file}"]
    for name, tag, file in (
        ("dinat_s_tiny", "in1k", "dinat_s_tiny_1k_224.pth"),
        ("dinat_s_small", "in1k", "dinat_s_small_1k_224.pth"),
        ("dinat_s_base", "in1k", "dinat_s_base_1k_224.pth"),
        ("dinat_s_large", "in22k_ft_in1k", "dinat_s_large_1k_224.pth"),
        ("dinat_s_large_384", "in22k_ft_in1k", "dinat_s_large_1k_384.pth"),
    )
}

default_cfgs = generate_default_cfgs(
    {
        "dinat_s_tiny.in1k": _dinat_s_cfg("imagenet1k/dinat_s_tiny_in1k_224.pth"),
        "dinat_s_small.in1k": _dinat_s_cfg("imagenet1k/dinat_s_small_in1k_224.pth"),
        "dinat_s_base.in1k": _dinat_s_cfg("imagenet1k/dinat_s_base_in1k_224.pth"),
        "dinat_s_large.in22k_ft_in1k": _dinat_s_cfg("imagenet1k/dinat_s_large_in1k_224.pth"),
        "dinat_s_large.in22k": _dinat_s_cfg(
            "imagenet22k/dinat_s_large_in22k_224.pth", num_classes=21841, notes=IN22K_NOTE
        ),
        "dinat_s_large_384.in22k_ft_in1k": _dinat_s_cfg(
            "imagenet1k/dinat_s_large_in1k_384.pth", input_size=(3, 384, 384), crop_pct=1.0
        ),
    }
)


_create_dinat_s = partial(_create_hierarchical, DiNATs, alternate_urls=ALTERNATE_URLS)


# DiNAT_s-Large: drop path 0.35 is the IN-1K fine-tuning setting of every tag; the official IN-22K pre-training
# used 0.2 (pass drop_path_rate=0.2 to train like it).
_LARGE = {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "drop_path_rate": 0.35}


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Tiny (28M params, 4.5 GMACs at 224)."""
    args = {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "drop_path_rate": 0.2,
                "dilations": DILATIONS_S_TINY}
    return _create_dinat_s("dinat_s_tiny", pretrained, args, **kwargs)


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Small (50M params, 8.7 GMACs at 224)."""
    args = {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24), "drop_path_rate": 0.3,
                "dilations": DILATIONS_S_224}
    return _create_dinat_s("dinat_s_small", pretrained, args, **kwargs)


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Base (88M params, 15.4 GMACs at 224)."""
    args = {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "drop_path_rate": 0.5,
                "dilations": DILATIONS_S_224}
    return _create_dinat_s("dinat_s_base", pretrained, args, **kwargs)


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Large at 224 (197M params, 34.5 GMACs); heads 6/12/24/48 as the released checkpoints need."""
    return _create_dinat_s("dinat_s_large", pretrained, dict(_LARGE, dilations=DILATIONS_S_224), **kwargs)


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Large at 384 (197M params, 101.5 GMACs) with the 384 dilation lists."""
    return _create_dinat_s("dinat_s_large_384", pretrained, dict(_LARGE, dilations=DILATIONS_S_384), **kwargs)
