"""Neighborhood Attention Transformer (NAT) and Dilated Neighborhood Attention Transformer (DiNAT).

Papers:
    * Neighborhood Attention Transformer, Hassani et al., CVPR 2023 - https://arxiv.org/abs/2204.07143
    * Dilated Neighborhood Attention Transformer, Hassani & Shi, 2022 - https://arxiv.org/abs/2209.15001

Module and parameter names follow the official implementation (SHI-Labs/Neighborhood-Attention-Transformer), so
the released checkpoints load strictly without renaming; the HF transformers ports load through the same
checkpoint filter. DiNAT is NAT with per-block dilation lists. Tokens are channels-last ``[B, H, W, C]`` between
modules; the input image is NCHW.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from natzoo.ops import NeighborhoodAttention2D

from ._helpers import build_with_weights, filter_checkpoint, pretrained_cfg

__all__ = ["NAT", "NATBase", "NATBlock", "NATStage", "ConvTokenizer", "ConvDownsampler", "checkpoint_filter_fn"]

DilationsArg = Optional[Sequence[Union[int, Sequence[int]]]]

# Per-block dilation lists of the official DiNAT classifiers (spec 1.2).
DILATIONS_224 = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1, 1, 1, 1, 1))
DILATIONS_224_MINI = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1, 1, 1, 1, 1))
DILATIONS_384 = ((1, 13, 1), (1, 6, 1, 6), (1, 3) * 9, (1, 1, 1, 1, 1))


def resolve_dilations(dilations: DilationsArg, depths: Sequence[int]) -> List[List[int]]:
    """Expands ``dilations`` (None, one int per stage, or one list per stage) to one list per stage.

    Raises:
        ValueError: When a stage's list length differs from its depth or a dilation is below 1.
    """
    if dilations is None:
        return [[1] * d for d in depths]
    if len(dilations) != len(depths):
        raise ValueError(f"dilations must have one entry per stage ({len(depths)}), got {len(dilations)}")
    out = []
    for i, (stage, depth) in enumerate(zip(dilations, depths)):
        stage_list = [stage] * depth if isinstance(stage, int) else [1 if d is None else d for d in stage]
        if len(stage_list) != depth:
            raise ValueError(f"dilations[{i}] must have {depth} entries (depths[{i}]), got {len(stage_list)}")
        if any(not isinstance(d, int) or d < 1 for d in stage_list):
            raise ValueError(f"dilations[{i}] must hold integers >= 1, got {list(stage_list)}")
        out.append(list(stage_list))
    return out


def fit_dilations(pattern: Sequence[Sequence[int]], depths: Optional[Sequence[int]]) -> Sequence[Sequence[int]]:
    """A variant's per-stage dilation pattern, cycled to other `depths` (used when a variant's depths are overridden).

    Example: ``[1, 8, 1]`` at depth 2 becomes ``[1, 8]``; ``[1, 2] * 9`` at depth 2 becomes ``[1, 2]``.
    """
    if depths is None or len(depths) != len(pattern):
        return pattern
    return tuple(tuple(stage[j % len(stage)] for j in range(depth)) for stage, depth in zip(pattern, depths))


def drop_path_schedule(drop_path_rate: float, total: int) -> List[float]:
    """``linspace(0, drop_path_rate, total)`` in plain Python (so it also works under a meta-device context)."""
    if total <= 1:
        return [0.0] * total
    return [drop_path_rate * i / (total - 1) for i in range(total)]


class ConvTokenizer(nn.Module):
    """Two 3x3 stride-2 convs (no norm or activation between them), then LayerNorm: NCHW image -> BHWC tokens."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64, norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """3x3 stride-2 conv without bias, then LayerNorm (norm after the conv): ``[B, H, W, C] -> [B, H', W', 2C]``."""

    def __init__(self, dim: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NATBlock(nn.Module):
    """Pre-norm neighborhood-attention transformer block with optional layer scale (``gamma1``/``gamma2``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: Optional[float] = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        clamp_dilation: bool = False,
    ):
        """
        Args:
            dim: Channels.
            num_heads: Attention heads.
            kernel_size: Neighborhood size.
            dilation: Neighborhood dilation.
            mlp_ratio: MLP hidden width over `dim`.
            qkv_bias: Bias in the qkv projection.
            qk_scale: Logit scale (None: ``head_dim ** -0.5``).
            proj_drop: Dropout after the attention and MLP projections.
            attn_drop: Dropout on attention probabilities.
            drop_path: Stochastic-depth rate of both residual branches.
            layer_scale: Initial value of the per-channel residual scales; None disables them (no parameters).
            act_layer: MLP activation.
            norm_layer: Normalization layer.
            clamp_dilation: Reduce the dilation at run time to ``max(1, size // kernel_size)`` per axis when the
                map is too small for it (off in every official model).
        """
        super().__init__()
        self.dim = dim
        self.clamp_dilation = clamp_dilation
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2D(
            dim,
            num_heads,
            kernel_size=kernel_size,
            dilation=dilation,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            rel_pos_bias=True,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:
            self.register_parameter("gamma1", None)
            self.register_parameter("gamma2", None)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.clamp_dilation:
            size, kernel = x.shape[1:3], self.attn.kernel_size
            dilation = tuple(max(1, min(d, s // k)) for d, s, k in zip(self.attn.dilation, size, kernel))
            if dilation != tuple(self.attn.dilation):
                return self.attn(x, dilation=dilation)
        return self.attn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, H, W, C]
        if self.gamma1 is None:
            x = x + self.drop_path(self._attention(self.norm1(x)))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.gamma1 * self._attention(self.norm1(x)))
            x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        return x


class NATStage(nn.Module):
    """One level: ``blocks`` at a fixed resolution, then an optional ``downsample`` (None in the last level)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        kernel_size: int = 7,
        dilations: Optional[Sequence[int]] = None,
        downsample: bool = True,
        downsample_layer: Callable[..., nn.Module] = ConvDownsampler,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Union[float, Sequence[float]] = 0.0,
        layer_scale: Optional[float] = None,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        clamp_dilation: bool = False,
    ):
        super().__init__()
        dilations = [1] * depth if dilations is None else list(dilations)
        drop_paths = [drop_path] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
        self.dim = dim
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            [
                NATBlock(
                    dim,
                    num_heads,
                    kernel_size=kernel_size,
                    dilation=dilations[j],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                    drop_path=drop_paths[j],
                    layer_scale=layer_scale,
                    norm_layer=norm_layer,
                    clamp_dilation=clamp_dilation,
                )
                for j in range(depth)
            ]
        )
        self.downsample = downsample_layer(dim, norm_layer=norm_layer) if downsample else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks only: the pre-downsample map ``[B, H, W, C]`` (the detection backbone's stage output)."""
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class NATBase(nn.Module):
    """The timm model interface shared by the hierarchical families (NAT/DiNAT and DiNAT_s).

    Subclasses build ``patch_embed``, ``pos_drop``, the stage list named by ``stages_attr``, ``norm``, ``head_drop``,
    ``head`` and ``feature_info``, and set ``num_classes``, ``global_pool``, ``in_chans`` and ``num_features``.
    """

    stages_attr = "levels"

    def _build(
        self,
        patch_embed: nn.Module,
        downsample_layer: Callable[..., nn.Module],
        in_chans: int,
        num_classes: int,
        global_pool: str,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        kernel_size: int,
        dilations: DilationsArg,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        drop_rate: float,
        proj_drop_rate: float,
        attn_drop_rate: float,
        drop_path_rate: float,
        layer_scale: Optional[float],
        norm_layer: Callable[..., nn.Module],
        clamp_dilation: bool,
    ) -> None:
        """Builds the trunk after the subclass's stem: stages named ``stages_attr``, final norm, head (in the
        official registration order), then the weight init. Arguments are those of the subclass constructors."""
        if global_pool not in ("", "avg"):
            raise ValueError(f"global_pool must be '' or 'avg', got {global_pool!r}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths and num_heads must have the same length, got {len(depths)} and {len(num_heads)}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_levels = len(depths)
        self.embed_dim = embed_dim
        self.kernel_size = kernel_size
        self.dilations = resolve_dilations(dilations, depths)
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (self.num_levels - 1))
        self.output_fmt = "NHWC"

        self.patch_embed = patch_embed
        self.pos_drop = nn.Dropout(p=proj_drop_rate)
        rates = drop_path_schedule(drop_path_rate, sum(depths))
        stages = nn.ModuleList()
        setattr(self, self.stages_attr, stages)
        self.feature_info: List[Dict[str, Any]] = []
        for i, depth in enumerate(depths):
            dim = int(embed_dim * 2**i)
            stages.append(
                NATStage(
                    dim,
                    depth,
                    num_heads[i],
                    kernel_size=kernel_size,
                    dilations=self.dilations[i],
                    downsample=i < self.num_levels - 1,
                    downsample_layer=downsample_layer,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    layer_scale=layer_scale,
                    norm_layer=norm_layer,
                    clamp_dilation=clamp_dilation,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"{self.stages_attr}.{i}"))
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
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

    @property
    def stages(self) -> nn.ModuleList:
        """The stage list (state-dict name ``levels`` or ``layers``), each stage with ``.blocks``/``.downsample``."""
        return getattr(self, self.stages_attr)

    @torch.jit.ignore
    def no_weight_decay(self, include_rpb: bool = True) -> Set[str]:
        """Parameter names exempt from weight decay: biases, norms, layer-scale gammas and (by default) ``rpb``.

        The official ImageNet recipe decayed ``rpb`` (timm 0.5.0 ignored its ``no_weight_decay_keywords``, spec
        5.3); pass ``include_rpb=False`` to reproduce that. The detection/segmentation recipes exempt it.
        """
        names = set()
        for name, param in self.named_parameters():
            is_rpb = name.endswith("attn.rpb")
            if (is_rpb and include_rpb) or (not is_rpb and param.ndim <= 1):
                names.add(name)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^patch_embed",
            blocks=rf"^{self.stages_attr}\.(\d+)"
            if coarse
            else [
                (rf"^{self.stages_attr}\.(\d+)\.downsample", (99998,)),
                (rf"^{self.stages_attr}\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

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

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__}: x must be [B, {self.in_chans}, H, W], got {tuple(x.shape)}")

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the pre-downsample level maps (strides 4, 8, 16, 32).

        Args:
            x: ``[B, C, H, W]`` image.
            indices: Take the last n levels if int, all if None, the listed ones if a sequence.
            norm: Apply the final norm to the last level's map.
            stop_early: Stop after the last requested level.
            output_fmt: ``'NCHW'`` or ``'NHWC'`` for the intermediates.
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or ``(final BHWC features, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.pos_drop(self.patch_embed(x))
        last = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        i = 0
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm and i == last else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x_inter)
            if stage.downsample is not None:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drops the levels (and the last kept level's downsampler) not needed for `indices`."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        setattr(self, self.stages_attr, self.stages[: max_index + 1])
        self.stages[-1].downsample = None
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` image -> normalised final map ``[B, ceil(H/32), ceil(W/32), num_features]``."""
        self._check_input(x)
        x = self.pos_drop(self.patch_embed(x))
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class NAT(NATBase):
    """NAT / DiNAT: convolutional tokenizer, four NA levels with conv downsamplers, LayerNorm, mean pool, head."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: Sequence[int] = (3, 4, 6, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        kernel_size: int = 7,
        dilations: DilationsArg = None,
        mlp_ratio: float = 3.0,
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
            global_pool: ``'avg'`` (mean over tokens) or ``''`` (no pooling in ``forward_head``).
            embed_dim: Channels of level 0; level ``i`` has ``embed_dim * 2**i``.
            depths: Blocks per level.
            num_heads: Heads per level.
            kernel_size: Neighborhood size of every block (7, or 11 for the 11x11 variants).
            dilations: Per-block dilations, one list (or one int) per level; None means all 1 (NAT).
            mlp_ratio: MLP hidden width over channels.
            qkv_bias: Bias in the qkv projections.
            qk_scale: Logit scale override.
            drop_rate: Dropout before the head (0 in the official models).
            proj_drop_rate: Dropout after attention/MLP projections (the official ``drop_rate``).
            attn_drop_rate: Dropout on attention probabilities.
            drop_path_rate: Final stochastic-depth rate; rates grow linearly over all blocks from 0.
            layer_scale: Layer-scale init value (1e-5 in nat_small, nat_base, dinat_base); None disables it.
            norm_layer: Normalization layer (LayerNorm, eps 1e-5).
            clamp_dilation: Clamp each block's dilation to what its feature map allows at run time (off by
                default, so outputs equal the official code, which pads instead).
        """
        super().__init__()
        self._build(
            ConvTokenizer(in_chans=in_chans, embed_dim=embed_dim, norm_layer=norm_layer), ConvDownsampler,
            in_chans, num_classes, global_pool, embed_dim, depths, num_heads, kernel_size, dilations, mlp_ratio,
            qkv_bias, qk_scale, drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate, layer_scale, norm_layer,
            clamp_dilation,
        )


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official ``.pth`` or HF-layout weights -> validated official layout (see ``models._helpers``)."""
    return filter_checkpoint(state_dict, model)


def _build(variant: str, pretrained: bool, **kwargs: Any) -> NAT:
    return build_model_with_cfg(
        NAT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _create_nat(variant: str, pretrained: bool = False, **kwargs: Any) -> NAT:
    return build_with_weights(_build, variant, pretrained, **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return pretrained_cfg(url, "patch_embed.proj.0", **kwargs)


_URL = "https://shi-labs.com/projects/"
_NAT_PAPER = dict(paper_ids="arXiv:2204.07143", paper_name="Neighborhood Attention Transformer")
_DINAT_PAPER = dict(paper_ids="arXiv:2209.15001", paper_name="Dilated Neighborhood Attention Transformer")
_DINAT_L_NOTE = (
    "The official DiNAT-Large files were replaced on 2023-01-17 (HF Hub 2023-01-18); outputs depend on the file "
    "version. Record its SHA-256 in models.CHECKPOINT_SHA256 after downloading.",
)
_IN22K_NOTE = ("ImageNet-22K head: the class count is read from the checkpoint's head.weight (probably 21841).",)


def _hf(hub_id: str) -> Tuple[str, ...]:
    return (f"HF transformers port: {hub_id} (loads through the same filter via pretrained_cfg_overlay).",)


default_cfgs = generate_default_cfgs(
    {
        "nat_mini.in1k": _cfg(
            _URL + "nat/checkpoints/CLS/nat_mini.pth", notes=_hf("shi-labs/nat-mini-in1k-224"), **_NAT_PAPER
        ),
        "nat_tiny.in1k": _cfg(
            _URL + "nat/checkpoints/CLS/nat_tiny.pth", notes=_hf("shi-labs/nat-tiny-in1k-224"), **_NAT_PAPER
        ),
        "nat_small.in1k": _cfg(
            _URL + "nat/checkpoints/CLS/nat_small.pth", notes=_hf("shi-labs/nat-small-in1k-224"), **_NAT_PAPER
        ),
        "nat_base.in1k": _cfg(
            _URL + "nat/checkpoints/CLS/nat_base.pth", notes=_hf("shi-labs/nat-base-in1k-224"), **_NAT_PAPER
        ),
        "dinat_mini.in1k": _cfg(
            _URL + "dinat/checkpoints/imagenet1k/dinat_mini_in1k_224.pth",
            notes=_hf("shi-labs/dinat-mini-in1k-224"),
            **_DINAT_PAPER,
        ),
        "dinat_tiny.in1k": _cfg(
            _URL + "dinat/checkpoints/imagenet1k/dinat_tiny_in1k_224.pth",
            notes=_hf("shi-labs/dinat-tiny-in1k-224"),
            **_DINAT_PAPER,
        ),
        "dinat_small.in1k": _cfg(
            _URL + "dinat/checkpoints/imagenet1k/dinat_small_in1k_224.pth",
            notes=_hf("shi-labs/dinat-small-in1k-224"),
            **_DINAT_PAPER,
        ),
        "dinat_base.in1k": _cfg(
            _URL + "dinat/checkpoints/imagenet1k/dinat_base_in1k_224.pth",
            notes=_hf("shi-labs/dinat-base-in1k-224"),
            **_DINAT_PAPER,
        ),
        "dinat_large.in22k_ft_in1k": _cfg(
            _URL + "dinat/checkpoints/imagenet1k/dinat_large_in22k_in1k_224.pth",
            notes=_DINAT_L_NOTE + _hf("shi-labs/dinat-large-in22k-in1k-224"),
            **_DINAT_PAPER,
        ),
        "dinat_large.in22k": _cfg(
            _URL + "dinat/checkpoints/imagenet22k/dinat_large_in22k_224.pth",
            num_classes=21841,
            notes=_DINAT_L_NOTE + _IN22K_NOTE,
            **_DINAT_PAPER,
        ),
        "dinat_large_384.in22k_ft_in1k": _cfg(
            _URL + "dinat/checkpoints/imagenet1k/dinat_large_in22k_in1k_384.pth",
            input_size=(3, 384, 384),
            crop_pct=1.0,
            notes=_DINAT_L_NOTE + _hf("shi-labs/dinat-large-in22k-in1k-384"),
            **_DINAT_PAPER,
        ),
        "dinat_large_384_11x11.in22k_ft_in1k": _cfg(
            _URL + "dinat/checkpoints/imagenet1k/dinat_large_in22k_in1k_384_11x11.pth",
            input_size=(3, 384, 384),
            crop_pct=1.0,
            notes=_DINAT_L_NOTE
            + _hf("shi-labs/dinat-large-11x11-in22k-in1k-384")
            + ("crop_pct 1.0 assumed as for dinat_large_384 (no official config).",),
            **_DINAT_PAPER,
        ),
        "dinat_large_11x11.in22k": _cfg(
            _URL + "dinat/checkpoints/imagenet22k/dinat_large_in22k_224_11x11interp.pth",
            num_classes=21841,
            notes=_DINAT_L_NOTE
            + _IN22K_NOTE
            + ("The 7x7 IN-22K file with every rpb bicubically resized 13x13 -> 21x21; meant for fine-tuning at 384.",),
            **_DINAT_PAPER,
        ),
    }
)


def _dinat_large_args(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    # The official IN-22K entrypoint (dinat_large_21k) uses drop path 0.2 instead of 0.35.
    drop_path = 0.2 if kwargs.get("pretrained_cfg") == "in22k" else 0.35
    return dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2.0, drop_path_rate=drop_path)


@register_model
def nat_mini(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Mini (20M params, 2.7 GMACs at 224)."""
    model_args = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2)
    return _create_nat("nat_mini", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Tiny (28M params, 4.3 GMACs at 224)."""
    model_args = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2)
    return _create_nat("nat_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Small (51M params, 7.8 GMACs at 224), layer scale 1e-5."""
    model_args = dict(
        embed_dim=96,
        depths=(3, 4, 18, 5),
        num_heads=(3, 6, 12, 24),
        mlp_ratio=2.0,
        drop_path_rate=0.3,
        layer_scale=1e-5,
    )
    return _create_nat("nat_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Base (90M params, 13.7 GMACs at 224), layer scale 1e-5."""
    model_args = dict(
        embed_dim=128,
        depths=(3, 4, 18, 5),
        num_heads=(4, 8, 16, 32),
        mlp_ratio=2.0,
        drop_path_rate=0.5,
        layer_scale=1e-5,
    )
    return _create_nat("nat_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_mini(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Mini (20M params, 2.7 GMACs at 224)."""
    model_args = dict(
        embed_dim=64,
        depths=(3, 4, 6, 5),
        num_heads=(2, 4, 8, 16),
        mlp_ratio=3.0,
        drop_path_rate=0.2,
        dilations=fit_dilations(DILATIONS_224_MINI, kwargs.get("depths")),
    )
    return _create_nat("dinat_mini", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Tiny (28M params, 4.3 GMACs at 224)."""
    model_args = dict(
        embed_dim=64,
        depths=(3, 4, 18, 5),
        num_heads=(2, 4, 8, 16),
        mlp_ratio=3.0,
        drop_path_rate=0.2,
        dilations=fit_dilations(DILATIONS_224, kwargs.get("depths")),
    )
    return _create_nat("dinat_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Small (51M params, 7.8 GMACs at 224); no layer scale, unlike NAT-Small."""
    model_args = dict(
        embed_dim=96,
        depths=(3, 4, 18, 5),
        num_heads=(3, 6, 12, 24),
        mlp_ratio=2.0,
        drop_path_rate=0.3,
        dilations=fit_dilations(DILATIONS_224, kwargs.get("depths")),
    )
    return _create_nat("dinat_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Base (90M params, 13.7 GMACs at 224), layer scale 1e-5."""
    model_args = dict(
        embed_dim=128,
        depths=(3, 4, 18, 5),
        num_heads=(4, 8, 16, 32),
        mlp_ratio=2.0,
        drop_path_rate=0.5,
        layer_scale=1e-5,
        dilations=fit_dilations(DILATIONS_224, kwargs.get("depths")),
    )
    return _create_nat("dinat_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 224 (200M params, 30.6 GMACs); IN-22K pre-trained."""
    model_args = dict(_dinat_large_args(kwargs), dilations=fit_dilations(DILATIONS_224, kwargs.get("depths")))
    return _create_nat("dinat_large", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 384 (200M params, 89.7 GMACs) with the 384 dilation lists."""
    model_args = dict(_dinat_large_args(kwargs), dilations=fit_dilations(DILATIONS_384, kwargs.get("depths")))
    return _create_nat("dinat_large_384", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_384_11x11(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large 11x11 at 384 (201M params, 92.4 GMACs) with the 224 dilation lists."""
    model_args = dict(
        _dinat_large_args(kwargs), kernel_size=11, dilations=fit_dilations(DILATIONS_224, kwargs.get("depths"))
    )
    return _create_nat("dinat_large_384_11x11", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_11x11(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large 11x11 at 224 (IN-22K weights only, for fine-tuning at 384)."""
    model_args = dict(
        _dinat_large_args(kwargs),
        kernel_size=11,
        dilations=fit_dilations(DILATIONS_224, kwargs.get("depths")),
        drop_path_rate=0.2,
    )
    return _create_nat("dinat_large_11x11", pretrained=pretrained, **dict(model_args, **kwargs))
