"""NAT / DiNAT / DiNAT_s as a dense-prediction backbone: the model's own ``forward_intermediates`` plus one output
LayerNorm per returned stage.

The backbone registers the trunk's ``patch_embed`` and stage list under the classifier's names (``levels``, or
``layers`` for DiNAT_s) and adds one LayerNorm ``norm{i}`` per output, so classification checkpoints and the
official downstream checkpoints (their ``backbone.`` prefix stripped) load with the official key names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from natzoo.models import NAT, LoadReport, NATStage, load_weights

__all__ = ["COCO_DILATION_PATTERNS", "NATBackbone", "checkpoint_filter_fn", "coco_dilations",
           "load_backbone_checkpoint"]

log = logging.getLogger(__name__)

# Per-stage dilation patterns of the official COCO configs (docs/detection.md), tiled to each stage's depth: for the
# released depths this reproduces the lists exactly ([1,3,1,5,1,7] x 3 for 18 blocks, x 1 for 6, DiNAT_s [1,28] ...).
COCO_DILATION_PATTERNS: dict[str, tuple[tuple[int, ...], ...]] = {
    "dinat": ((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 7), (1, 3, 1, 3, 1)),
    "dinat_s": ((1, 28), (1, 14), (1, 3, 1, 5, 1, 7), (1, 3)),
}

# Keys a backbone may lack in a checkpoint (its output norms) and checkpoint keys it ignores (the classifier's final
# norm and head, and output norms of stages it does not return); everything else must match.
_OPTIONAL_KEYS = (r"norm\d+\.(weight|bias)",)
_IGNORED_KEYS = (r"norm\.(weight|bias)", r"head\.(weight|bias)", r"norm\d+\.(weight|bias)")


def model_family(model_name: str) -> str:
    """``'nat'``, ``'dinat'`` or ``'dinat_s'`` for a hierarchical registry name (any ``.tag`` suffix ignored).

    Raises:
        ValueError: The name is not a registered model, or not a hierarchical NAT-family model.
    """
    if not isinstance(model_name, str):
        raise TypeError(f"backbone name must be a str, got {type(model_name).__name__}")
    base = model_name.split(".", 1)[0]
    if not timm.is_model(base):
        nat_names = [n for n in timm.list_models(["nat_*", "dinat_*"]) if "isotropic" not in n]
        raise ValueError(f"backbone={model_name!r} is not a registered model; hierarchical NAT-family names: "
                         f"{nat_names}")
    if "isotropic" in base or base.startswith("vitrpb"):
        raise ValueError(
            f"backbone={model_name!r} is an isotropic model (one 14x14 resolution, fixed 224 input); a detection "
            "backbone needs a hierarchical NAT, DiNAT or DiNAT_s variant"
        )
    if base.startswith("dinat_s_"):
        return "dinat_s"
    if base.startswith("dinat_"):
        return "dinat"
    if base.startswith("nat_"):
        return "nat"
    raise ValueError(f"backbone={model_name!r} is not a NAT, DiNAT or DiNAT_s model")


def coco_dilations(model_name: str, depths: Sequence[int]) -> list[list[int]] | None:
    """The COCO (Mask / Cascade R-CNN) per-block dilations of the official configs for a variant with these ``depths``.

    Returns None (all 1) for NAT. Stage patterns are tiled to the stage depth, which gives the official lists for
    the released depths and a consistent extension for shortened test models.
    """
    family = model_family(model_name)
    if family == "nat":
        return None
    patterns = COCO_DILATION_PATTERNS[family]
    if len(depths) != len(patterns):
        raise ValueError(f"COCO dilations are defined for 4 stages, got depths={list(depths)}")
    return [[pattern[j % len(pattern)] for j in range(depth)] for pattern, depth in zip(patterns, depths)]


def _model_depths(model_name: str, model_kwargs: Mapping[str, Any]) -> list[int]:
    if "depths" in model_kwargs:
        return [int(d) for d in model_kwargs["depths"]]
    # Build on the meta device: no memory or init cost, only the structure is read.
    with torch.device("meta"):
        kwargs = {k: v for k, v in model_kwargs.items() if k != "dilations"}
        trunk = cast(NAT, timm.create_model(model_name, num_classes=0, **kwargs))
    return [len(stage.blocks) for stage in trunk.stages]


def _select_backbone_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strips the prefix under which a trunk is nested in a downstream checkpoint, if any."""
    anchor = "patch_embed.proj"
    if any(k.startswith(anchor) for k in state_dict):
        return state_dict
    prefixes = sorted({k[: k.index(anchor)] for k in state_dict if anchor in k})
    # mmdet/mmseg nest the trunk under "backbone.", this project's detectors under "backbone.body." (torchvision).
    if len(prefixes) != 1:
        raise ValueError(
            f"cannot locate the backbone in the checkpoint: expected keys starting with 'patch_embed.' under one "
            f"prefix, found prefixes {prefixes or 'none'} (first keys: {sorted(state_dict)[:5]})"
        )
    prefix = prefixes[0]
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    log.info("Loading the backbone from keys under %r (%d other keys ignored)", prefix, len(state_dict) - len(selected))
    return selected


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The trunk family's key work (HF transformers layout -> official), then the trunk's keys out of a downstream
    checkpoint (``backbone.``, ``backbone.body.``)."""
    trunk = cast(NATBackbone, backbone).trunk
    family_filter = type(trunk).checkpoint_filter
    state = family_filter(state_dict, trunk) if family_filter is not None else dict(state_dict)
    return _select_backbone_keys(state)


class NATBackbone(nn.Module):
    """Multi-scale NAT-family backbone: four pre-downsample stage maps, each through its own LayerNorm, as NCHW.

    Output ``i`` has stride ``4 * 2**i`` (spatial size ``ceil(S / stride)`` for an input side ``S``) and
    ``embed_dim * 2**i`` channels.

    Args:
        model_name: Registry name of a hierarchical NAT, DiNAT or DiNAT_s variant (e.g. ``"dinat_tiny"``).
        out_indices: Stages whose pre-downsample maps are returned, in increasing order.
        frozen_stages: -1 freezes nothing; 0 or 1 freezes ``patch_embed``; ``k >= 2`` also freezes stages
            ``0..k-2`` with their downsamplers. Frozen modules stay in eval mode with
            ``requires_grad=False`` across ``train()`` calls; the output norms are never frozen.
        norm_eval: Keep BatchNorm layers of the backbone in eval mode while training (mmdet's option; NAT-family
            trunks only have LayerNorms, which behave the same in both modes, so it only matters for custom trunks).
        dilations: Per-block dilations: None keeps the variant's own (classification) lists, ``"coco"`` selects
            the lists of the official COCO configs, or an explicit list per stage.
        drop_path_rate: Stochastic-depth rate (None keeps the variant's default).
        pretrained: Path of a classification checkpoint (official ``.pth``, HF ``.bin``/``.safetensors``, or this
            project's Lightning ``.ckpt``) loaded with :func:`load_backbone_checkpoint`.
        **model_kwargs: Further constructor overrides (``embed_dim``, ``depths``, ``num_heads``, ``kernel_size``,
            ``layer_scale``, ...).
    """

    checkpoint_filter = staticmethod(checkpoint_filter_fn)

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        dilations: str | Sequence[Sequence[int]] | None = None,
        drop_path_rate: float | None = None,
        pretrained: str | os.PathLike | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.family = model_family(model_name)
        num_stages = len(model_kwargs["depths"]) if "depths" in model_kwargs else 4
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or any(i < 0 or i >= num_stages for i in out_indices):
            raise ValueError(f"out_indices={list(out_indices)} must be non-empty stage indices in "
                             f"[0, {num_stages - 1}]")
        if len(set(out_indices)) != len(out_indices) or list(out_indices) != sorted(out_indices):
            raise ValueError(f"out_indices={list(out_indices)} must be strictly increasing")
        if not isinstance(frozen_stages, int) or isinstance(frozen_stages, bool):
            raise TypeError(f"frozen_stages must be an int, got {type(frozen_stages).__name__}")
        if not -1 <= frozen_stages <= num_stages + 1:
            raise ValueError(
                f"frozen_stages={frozen_stages} is out of range for {num_stages} stages: use -1 (nothing), 0/1 "
                f"(patch_embed) or k in 2..{num_stages + 1} (patch_embed and stages 0..k-2)"
            )
        if isinstance(dilations, str):
            if dilations != "coco":
                raise ValueError(f"dilations must be None, 'coco' or a list per stage, got {dilations!r}")
            dilations = coco_dilations(model_name, _model_depths(model_name, model_kwargs))
            if dilations is not None:
                model_kwargs["dilations"] = dilations
        elif dilations is not None:
            model_kwargs["dilations"] = [list(d) for d in dilations]
        if drop_path_rate is not None:
            model_kwargs["drop_path_rate"] = float(drop_path_rate)

        trunk = cast(NAT, timm.create_model(model_name, num_classes=0, **model_kwargs))  # a NAT family (checked above)
        if len(trunk.stages) != num_stages:
            raise ValueError(f"{model_name} has {len(trunk.stages)} stages; out_indices/frozen_stages assumed "
                             f"{num_stages}")
        # The outputs get their own norms: the classifier's final norm and head go.
        trunk.prune_intermediate_layers(len(trunk.stages), prune_norm=True)
        self.stage_attr = trunk.stages_attr
        self.patch_embed = trunk.patch_embed
        self.pos_drop = trunk.pos_drop
        setattr(self, self.stage_attr, trunk.stages)
        # Not registered (its modules are, above, under the official names): runs its own forward_intermediates.
        self._trunk = (trunk,)
        channels = [int(info["num_chs"]) for info in trunk.feature_info]
        self.out_indices = out_indices
        self.out_channels_list = [channels[i] for i in out_indices]
        self.strides = [int(trunk.feature_info[i]["reduction"]) for i in out_indices]
        # nn.Module.__getattr__ types submodules and buffers as Tensor | Module
        self.dilations = [[int(blk.attn.dilation[0]) for blk in stage.blocks] for stage in trunk.stages]  # type: ignore[index, union-attr]
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(channels[i]))
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        if pretrained:
            load_backbone_checkpoint(self, pretrained)
        self._freeze_stages()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recomputes the stages' block activations in the backward (``model.grad_checkpointing``)."""
        self.trunk.set_grad_checkpointing(enable)

    @property
    def trunk(self) -> NAT:
        """The classification model whose modules this backbone registers (without its final norm and head)."""
        return self._trunk[0]

    @property
    def stages(self) -> Sequence[NATStage]:
        """The stage list (``levels`` for NAT/DiNAT, ``layers`` for DiNAT_s)."""
        return getattr(self, self.stage_attr)

    def frozen_modules(self) -> list[nn.Module]:
        """The modules ``frozen_stages`` freezes (see the class docstring)."""
        if self.frozen_stages < 0:
            return []
        return [self.patch_embed, *list(self.stages)[: max(self.frozen_stages - 1, 0)]]

    def _freeze_stages(self) -> None:
        for module in self.frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> NATBackbone:
        """Sets the train mode, then re-applies ``frozen_stages`` and ``norm_eval``."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage maps for an NCHW image batch ``[B, 3, H, W]``; stages after the last output are not run.

        Returns:
            One ``[B, C_i, ceil(H / s_i), ceil(W / s_i)]`` tensor per entry of ``out_indices``.
        """
        maps = self.trunk.forward_intermediates(
            x, indices=list(self.out_indices), stop_early=True, output_fmt="NHWC", intermediates_only=True
        )
        # [B, H_i, W_i, C_i] -> norm{i} -> [B, C_i, H_i, W_i]
        return [getattr(self, f"norm{i}")(m).permute(0, 3, 1, 2).contiguous() for i, m in zip(self.out_indices, maps)]



def load_backbone_checkpoint(
    backbone: NATBackbone, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    source: str | os.PathLike | None = None,
) -> LoadReport:
    """Loads classification (or downstream) weights into a :class:`NATBackbone` through
    :func:`natzoo.models.load_weights`.

    Accepts the official layout, the HF transformers layout (classifier or ``*Backbone``), training checkpoints
    (``model``/``state_dict`` wrappers, ``module.`` prefixes) and nested trunks (``backbone.``, ``backbone.body.``).
    RPB tables of another kernel size are resized bicubically. A LightningModule's ``model.`` prefix is the training
    code's to strip (:func:`natzoo.checkpoints.network_weights`). `source` names the file a state dict came
    from in messages.

    Returns:
        The report: missing keys are only output norms ``norm{i}.*`` the checkpoint lacks, unexpected keys only the
        classifier's ``norm.*`` and ``head.*`` (and output norms of stages this backbone does not return).

    Raises:
        ValueError: Any other missing, unexpected or mis-shaped key, listed in the message.
    """
    return load_weights(backbone, checkpoint, allow_missing=_OPTIONAL_KEYS, allow_unexpected=_IGNORED_KEYS,
                        source=source)
