"""Neighborhood Attention Transformer (NAT) and Dilated Neighborhood Attention Transformer (DiNAT).

Papers:
    * Neighborhood Attention Transformer, Hassani et al., CVPR 2023 - https://arxiv.org/abs/2204.07143
    * Dilated Neighborhood Attention Transformer, Hassani & Shi, 2022 - https://arxiv.org/abs/2209.15001

Module and parameter names follow the official implementation (SHI-Labs/Neighborhood-Attention-Transformer), so
the released checkpoints load strictly without renaming; the HF transformers ports are converted by this family's
``checkpoint_filter_fn``. DiNAT is NAT with per-block dilation lists. Tokens are channels-last ``[B, H, W, C]``
between modules; the input image is NCHW.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.fx
from ..ops import NeighborhoodAttention2D
from ..ops.neighborhood.validation import check_int, check_rate
from timm.layers import DropPath, Mlp
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import nn

from ._base import NATBase, check_int_sequence, check_model_args, pretrained_cfg, variant_args
from ._weights import StateDict, load_state_dict_overlay, local_weights

__all__ = [
    "NAT",
    "ConvDownsampler",
    "ConvTokenizer",
    "NATBlock",
    "NATStage",
    "checkpoint_filter_fn",
    "convert_hf_state_dict",
    "is_hf_state_dict",
]

DilationsArg = Sequence[int | Sequence[int]] | None

# Per-block dilation lists of the official DiNAT classifiers, one list per stage (docs/models.md).
DILATIONS_224 = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1, 1, 1, 1, 1))
DILATIONS_224_MINI = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1, 1, 1, 1, 1))
DILATIONS_384 = ((1, 13, 1), (1, 6, 1, 6), (1, 3) * 9, (1, 1, 1, 1, 1))


def resolve_dilations(owner: str, dilations: DilationsArg, depths: Sequence[int]) -> list[list[int]]:
    """Expands ``dilations`` (None, one int per stage, or one list per stage) to one list per stage.

    Raises:
        TypeError: An entry is not an int (or a stage not an int or a list).
        ValueError: A stage's list length differs from its depth, or a dilation is below 1.
    """
    if dilations is None:
        return [[1] * d for d in depths]
    if not isinstance(dilations, Sequence) or isinstance(dilations, str):
        raise TypeError(f"{owner}: dilations must be None or one int or list per stage, got {dilations!r}")
    if len(dilations) != len(depths):
        raise ValueError(f"{owner}: dilations must have one entry per stage ({len(depths)}), got {len(dilations)}")
    out = []
    for i, (stage, depth) in enumerate(zip(dilations, depths)):
        stage_list = list(stage) if isinstance(stage, Sequence) and not isinstance(stage, str) else [stage] * depth
        if len(stage_list) != depth:
            raise ValueError(f"{owner}: dilations[{i}] must have {depth} entries (depths[{i}]), got {len(stage_list)}")
        out.append([check_int(owner, f"dilations[{i}][{j}]", d) for j, d in enumerate(stage_list)])
    return out


def drop_path_schedule(drop_path_rate: float, total: int) -> list[float]:
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
        x = x.permute(0, 3, 1, 2)  # [B, C, H, W] view with channels-last strides
        if isinstance(x.shape[2], torch.SymInt) or isinstance(x.shape[3], torch.SymInt):
            # Traced with symbolic H or W (torch.compile with dynamic shapes), inductor fails on a convolution of
            # this view: it sorts the view's symbolic strides without its shape environment ("cannot determine truth
            # value of Relational"). A contiguous copy avoids that; eager and static-shape runs keep the view.
            x = x.contiguous()
        return self.norm(self.reduction(x).permute(0, 2, 3, 1))


@torch.fx.wrap
def _clamped_dilation(x: torch.Tensor, dilation: tuple[int, ...], kernel_size: tuple[int, ...]) -> tuple[int, ...]:
    """Each axis' dilation reduced to what the map ``x [B, H, W, C]`` allows: ``max(1, min(d, size // k))``."""
    return tuple(max(1, min(d, s // k)) for d, s, k in zip(dilation, x.shape[1:3], kernel_size))


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
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
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
        check_model_args("NATBlock", mlp_ratio=mlp_ratio, layer_scale=layer_scale, clamp_dilation=clamp_dilation)
        check_rate("NATBlock", "drop_path", drop_path)
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
        # timm annotates a class here; any module factory works
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)  # type: ignore[arg-type]
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:
            self.register_parameter("gamma1", None)
            self.register_parameter("gamma2", None)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.clamp_dilation:
            return self.attn(x, dilation=_clamped_dilation(x, self.attn.dilation, self.attn.kernel_size))
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
        dilations: Sequence[int] | None = None,
        downsample: bool = True,
        downsample_layer: Callable[..., nn.Module] = ConvDownsampler,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
        layer_scale: float | None = None,
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


_HF_PREFIXES = ("nat.", "dinat.")
_HF_LAYER_NAMES = (
    ("layernorm_before.", "norm1."),
    ("attention.self.rpb", "attn.rpb"),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_HF_NAMES = (
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("embeddings.norm.", "patch_embed.norm."),
    ("encoder.levels.", "levels."),
    ("layernorm.", "norm."),
    ("classifier.", "head."),
)
_HF_LAYER = re.compile(r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^attention\.self\.(query|key|value)\.(weight|bias)$")
_HF_BACKBONE_NORM = re.compile(r"^hidden_states_norms\.stage(\d+)\.(.+)$")


def is_hf_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for the HF transformers layout (classifier or backbone) of NAT/DiNAT weights."""
    return any(
        k.startswith(_HF_PREFIXES + ("embeddings.", "encoder.levels.", "hidden_states_norms.")) for k in state_dict
    )


def convert_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Converts HF transformers NAT/DiNAT weights to the official key layout (docs/models.md lists the mapping).

    Handles the classifier models (``nat.``/``dinat.`` prefix, ``classifier.*`` head) and the backbones (no prefix,
    ``hidden_states_norms.stage{k}`` -> ``norm{k-1}``, as the official detection backbone names them). Keys it does
    not know are passed through unchanged so that a strict load reports them.

    Args:
        state_dict: HF-layout state dict.

    Returns:
        The same tensors under official names, with ``attn.qkv`` concatenated from query/key/value and
        ``gamma1``/``gamma2`` split from ``layer_scale_parameters``.
    """
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        key = next((name[len(p):] for p in _HF_PREFIXES if name.startswith(p)), name)
        layer = _HF_LAYER.match(key)
        if layer is not None:
            block, rest = f"levels.{layer.group(1)}.blocks.{layer.group(2)}.", layer.group(3)
            part = _HF_QKV.match(rest)
            if part is not None:
                qkv.setdefault(f"{block}attn.qkv.{part.group(2)}", {})[part.group(1)] = tensor
            elif rest == "layer_scale_parameters":
                out[f"{block}gamma1"], out[f"{block}gamma2"] = tensor[0].clone(), tensor[1].clone()
            else:
                hf, official = next(((h, o) for h, o in _HF_LAYER_NAMES if rest.startswith(h)), ("", ""))
                out[block + official + rest[len(hf):]] = tensor
            continue
        norm = _HF_BACKBONE_NORM.match(key)
        if norm is not None:
            key = f"norm{int(norm.group(1)) - 1}.{norm.group(2)}"
        else:
            key = next((official + key[len(hf):] for hf, official in _HF_NAMES if key.startswith(hf)), key)
        out[key] = tensor
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"convert_hf_state_dict: {key} needs query, key and value; found only {sorted(parts)}")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """The NAT/DiNAT key work: weights in the HF transformers layout are converted to the official names (official
    files pass unchanged)."""
    return convert_hf_state_dict(state_dict) if is_hf_state_dict(state_dict) else dict(state_dict)


class NAT(NATBase):
    """NAT / DiNAT: convolutional tokenizer, four NA levels with conv downsamplers, LayerNorm, mean pool, head.

    The hierarchical trunk is shared with DiNAT_s (:class:`natzoo.models.DiNATs`), which swaps the stem, the
    downsampler and the stage-list name through `stem_layer`, `downsample_layer` and ``stages_attr``.
    """

    stages_attr = "levels"
    checkpoint_filter = staticmethod(checkpoint_filter_fn)

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
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        layer_scale: float | None = None,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        clamp_dilation: bool = False,
        stem_layer: Callable[..., nn.Module] = ConvTokenizer,
        downsample_layer: Callable[..., nn.Module] = ConvDownsampler,
    ):
        """
        Args:
            in_chans: Input image channels.
            num_classes: Classifier outputs; 0 replaces the head with Identity.
            global_pool: ``'avg'`` (mean over tokens) or ``''`` (no pooling in ``forward_head``).
            embed_dim: Channels of level 0; level ``i`` has ``embed_dim * 2**i``.
            depths: Blocks per level.
            num_heads: Heads per level; each must divide its level's channels.
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
            stem_layer: ``(in_chans=, embed_dim=, norm_layer=)`` -> module mapping the NCHW image to
                ``[B, H/4, W/4, embed_dim]``.
            downsample_layer: ``(dim, norm_layer=)`` -> module mapping ``[B, H, W, dim]`` to
                ``[B, ceil(H/2), ceil(W/2), 2 * dim]``.

        Raises:
            TypeError: An argument of the wrong type, named in the message.
            ValueError: An argument out of range, named in the message.
        """
        super().__init__()
        owner = type(self).__name__
        check_model_args(
            owner, in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, embed_dim=embed_dim,
            kernel_size=kernel_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate,
            proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
            layer_scale=layer_scale, clamp_dilation=clamp_dilation,
        )
        depths = check_int_sequence(owner, "depths", depths)
        num_heads = check_int_sequence(owner, "num_heads", num_heads, length=len(depths))
        widths = [embed_dim * 2**i for i in range(len(depths))]
        for i, (width, heads) in enumerate(zip(widths, num_heads)):
            if width % heads:
                raise ValueError(f"{owner}: num_heads[{i}]={heads} must divide level {i}'s width "
                                 f"embed_dim * 2**{i} = {width}")
        self.dilations = resolve_dilations(owner, dilations, depths)
        self.in_chans = in_chans
        self.num_levels = len(depths)
        self.embed_dim = embed_dim
        self.kernel_size = kernel_size

        self.patch_embed = stem_layer(in_chans=in_chans, embed_dim=embed_dim, norm_layer=norm_layer)
        self.pos_drop = nn.Dropout(p=proj_drop_rate)
        rates = drop_path_schedule(drop_path_rate, sum(depths))
        stages = nn.ModuleList()
        setattr(self, self.stages_attr, stages)
        self.feature_info: list[dict[str, Any]] = []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            stages.append(
                NATStage(
                    width,
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
            # The last block's output is the pre-downsample map (what hooks and FX extraction return).
            last_block = f"{self.stages_attr}.{i}.blocks.{depth - 1}"
            self.feature_info.append({"num_chs": width, "reduction": 4 * 2**i, "module": last_block})
        self.norm = norm_layer(widths[-1])
        self._init_head(widths[-1], num_classes, global_pool, drop_rate)
        self.init_weights()

    @property
    def stages(self) -> Sequence[NATStage]:  # an nn.ModuleList of NATStage
        """The stage list (state-dict name ``levels`` or ``layers``), each stage with ``.blocks``/``.downsample``."""
        return getattr(self, self.stages_attr)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {
            "stem": r"^patch_embed",
            "blocks": rf"^{self.stages_attr}\.(\d+)"
            if coarse
            else [
                (rf"^{self.stages_attr}\.(\d+)\.downsample", (99998,)),
                (rf"^{self.stages_attr}\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
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
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.pos_drop(self.patch_embed(self._check_input(x)))
        last = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        i = 0
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm and i == last else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x_inter)
            if intermediates_only and i == max_index:
                break  # nothing after the last requested level is returned
            if stage.downsample is not None:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
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
        x = self.pos_drop(self.patch_embed(self._check_input(x)))
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)


_Model = TypeVar("_Model", bound="NAT")


def _create_hierarchical(
    cls: type[_Model], variant: str, pretrained: bool, model_args: Mapping[str, Any],
    alternate_urls: Mapping[str, Sequence[str]] | None = None, **kwargs: Any,
) -> _Model:
    """The creation function of the hierarchical family (NAT, DiNAT and, with ``cls=DiNATs``, DiNAT_s)."""
    return build_model_with_cfg(
        cls, variant, pretrained, pretrained_filter_fn=load_state_dict_overlay,
        feature_cfg={"out_indices": (0, 1, 2, 3), "feature_cls": "getter"},
        **local_weights(variant, pretrained, variant_args(model_args, kwargs), alternate_urls),
    )


def _cfg(url: str, **kwargs: Any) -> dict[str, Any]:
    return pretrained_cfg(url, "patch_embed.proj.0", reduction=32, **kwargs)


_URL = "https://shi-labs.com/projects/"
_NAT_PAPER = {"paper_ids": "arXiv:2204.07143", "paper_name": "Neighborhood Attention Transformer"}
_DINAT_PAPER = {"paper_ids": "arXiv:2209.15001", "paper_name": "Dilated Neighborhood Attention Transformer"}
_DINAT_L_NOTE = (
    ("The official DiNAT-Large files were replaced on 2023-01-17 (HF Hub 2023-01-18); outputs depend on the file "
    "version. Record its SHA-256 in natzoo.models.CHECKPOINT_SHA256 after downloading."),
)
IN22K_NOTE = ("ImageNet-22K head: the class count is read from the checkpoint's head.weight (probably 21841).",)


def _hf(hub_id: str) -> tuple[str, ...]:
    return (f"HF transformers port: {hub_id} (loads through pretrained_cfg_overlay=dict(hf_hub_id=...) or file=).",)


def _nat_cfg(name: str, hub_id: str) -> dict[str, Any]:
    return _cfg(_URL + f"nat/checkpoints/CLS/{name}.pth", notes=_hf(hub_id), **_NAT_PAPER)


def _dinat_cfg(path: str, notes: tuple[str, ...] = (), **kwargs: Any) -> dict[str, Any]:
    return _cfg(_URL + "dinat/checkpoints/" + path, notes=notes, **_DINAT_PAPER, **kwargs)


_AT_384 = {"input_size": (3, 384, 384), "crop_pct": 1.0}

default_cfgs = generate_default_cfgs(
    {
        "nat_mini.in1k": _nat_cfg("nat_mini", "shi-labs/nat-mini-in1k-224"),
        "nat_tiny.in1k": _nat_cfg("nat_tiny", "shi-labs/nat-tiny-in1k-224"),
        "nat_small.in1k": _nat_cfg("nat_small", "shi-labs/nat-small-in1k-224"),
        "nat_base.in1k": _nat_cfg("nat_base", "shi-labs/nat-base-in1k-224"),
        "dinat_mini.in1k": _dinat_cfg("imagenet1k/dinat_mini_in1k_224.pth", _hf("shi-labs/dinat-mini-in1k-224")),
        "dinat_tiny.in1k": _dinat_cfg("imagenet1k/dinat_tiny_in1k_224.pth", _hf("shi-labs/dinat-tiny-in1k-224")),
        "dinat_small.in1k": _dinat_cfg("imagenet1k/dinat_small_in1k_224.pth", _hf("shi-labs/dinat-small-in1k-224")),
        "dinat_base.in1k": _dinat_cfg("imagenet1k/dinat_base_in1k_224.pth", _hf("shi-labs/dinat-base-in1k-224")),
        "dinat_large.in22k_ft_in1k": _dinat_cfg(
            "imagenet1k/dinat_large_in22k_in1k_224.pth", _DINAT_L_NOTE + _hf("shi-labs/dinat-large-in22k-in1k-224")
        ),
        "dinat_large.in22k": _dinat_cfg(
            "imagenet22k/dinat_large_in22k_224.pth", _DINAT_L_NOTE + IN22K_NOTE, num_classes=21841
        ),
        "dinat_large_384.in22k_ft_in1k": _dinat_cfg(
            "imagenet1k/dinat_large_in22k_in1k_384.pth",
            _DINAT_L_NOTE + _hf("shi-labs/dinat-large-in22k-in1k-384"),
            **_AT_384,
        ),
        "dinat_large_384_11x11.in22k_ft_in1k": _dinat_cfg(
            "imagenet1k/dinat_large_in22k_in1k_384_11x11.pth",
            _DINAT_L_NOTE + _hf("shi-labs/dinat-large-11x11-in22k-in1k-384")
            + ("crop_pct 1.0 assumed as for dinat_large_384 (no official config).",),
            **_AT_384,
        ),
        "dinat_large_11x11.in22k": _dinat_cfg(
            "imagenet22k/dinat_large_in22k_224_11x11interp.pth",
            _DINAT_L_NOTE + IN22K_NOTE
            + ("The 7x7 IN-22K file with every rpb bicubically resized 13x13 -> 21x21; meant for fine-tuning at 384.",),
            num_classes=21841,
        ),
    }
)

# Shared sizes of the variants; drop_path_rate is each variant's own (IN-1K training) default.
_MINI = {"embed_dim": 64, "depths": (3, 4, 6, 5), "num_heads": (2, 4, 8, 16), "mlp_ratio": 3.0}
_TINY = {"embed_dim": 64, "depths": (3, 4, 18, 5), "num_heads": (2, 4, 8, 16), "mlp_ratio": 3.0}
_SMALL = {"embed_dim": 96, "depths": (3, 4, 18, 5), "num_heads": (3, 6, 12, 24), "mlp_ratio": 2.0}
_BASE = {"embed_dim": 128, "depths": (3, 4, 18, 5), "num_heads": (4, 8, 16, 32), "mlp_ratio": 2.0}
# DiNAT-Large: drop path 0.35 is the IN-1K fine-tuning setting of every tag; the official IN-22K pre-training used 0.2
# (pass drop_path_rate=0.2 to train like it). Inference does not depend on it.
_LARGE = {
    "embed_dim": 192, "depths": (3, 4, 18, 5), "num_heads": (6, 12, 24, 48), "mlp_ratio": 2.0, "drop_path_rate": 0.35
}


@register_model
def nat_mini(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Mini (20M params, 2.7 GMACs at 224)."""
    return _create_hierarchical(NAT, "nat_mini", pretrained, dict(_MINI, drop_path_rate=0.2), **kwargs)


@register_model
def nat_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Tiny (28M params, 4.3 GMACs at 224)."""
    return _create_hierarchical(NAT, "nat_tiny", pretrained, dict(_TINY, drop_path_rate=0.2), **kwargs)


@register_model
def nat_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Small (51M params, 7.8 GMACs at 224), layer scale 1e-5."""
    args = dict(_SMALL, drop_path_rate=0.3, layer_scale=1e-5)
    return _create_hierarchical(NAT, "nat_small", pretrained, args, **kwargs)


@register_model
def nat_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Base (90M params, 13.7 GMACs at 224), layer scale 1e-5."""
    args = dict(_BASE, drop_path_rate=0.5, layer_scale=1e-5)
    return _create_hierarchical(NAT, "nat_base", pretrained, args, **kwargs)


@register_model
def dinat_mini(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Mini (20M params, 2.7 GMACs at 224)."""
    args = dict(_MINI, drop_path_rate=0.2, dilations=DILATIONS_224_MINI)
    return _create_hierarchical(NAT, "dinat_mini", pretrained, args, **kwargs)


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Tiny (28M params, 4.3 GMACs at 224)."""
    args = dict(_TINY, drop_path_rate=0.2, dilations=DILATIONS_224)
    return _create_hierarchical(NAT, "dinat_tiny", pretrained, args, **kwargs)


@register_model
def dinat_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Small (51M params, 7.8 GMACs at 224); no layer scale, unlike NAT-Small."""
    args = dict(_SMALL, drop_path_rate=0.3, dilations=DILATIONS_224)
    return _create_hierarchical(NAT, "dinat_small", pretrained, args, **kwargs)


@register_model
def dinat_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Base (90M params, 13.7 GMACs at 224), layer scale 1e-5."""
    args = dict(_BASE, drop_path_rate=0.5, layer_scale=1e-5, dilations=DILATIONS_224)
    return _create_hierarchical(NAT, "dinat_base", pretrained, args, **kwargs)


@register_model
def dinat_large(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 224 (200M params, 30.6 GMACs); IN-22K pre-trained."""
    return _create_hierarchical(NAT, "dinat_large", pretrained, dict(_LARGE, dilations=DILATIONS_224), **kwargs)


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 384 (200M params, 89.7 GMACs) with the 384 dilation lists."""
    return _create_hierarchical(NAT, "dinat_large_384", pretrained, dict(_LARGE, dilations=DILATIONS_384), **kwargs)


@register_model
def dinat_large_384_11x11(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large 11x11 at 384 (201M params, 92.4 GMACs) with the 224 dilation lists."""
    args = dict(_LARGE, kernel_size=11, dilations=DILATIONS_224)
    return _create_hierarchical(NAT, "dinat_large_384_11x11", pretrained, args, **kwargs)


@register_model
def dinat_large_11x11(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large 11x11 at 224 (IN-22K weights only, for fine-tuning at 384; drop path 0.2 as pre-trained)."""
    args = dict(_LARGE, kernel_size=11, dilations=DILATIONS_224, drop_path_rate=0.2)
    return _create_hierarchical(NAT, "dinat_large_11x11", pretrained, args, **kwargs)
