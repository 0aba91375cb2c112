"""What every NAT family shares: the timm model interface (:class:`NATBase`), argument checks, pretrained cfgs and
variant arguments."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from ..ops.neighborhood.validation import check_bool, check_int, check_rate, check_real
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from torch import nn

from ._weights import StateDict, load_weights

__all__ = ["NATBase", "check_int_sequence", "check_model_args", "pretrained_cfg", "variant_args"]

GLOBAL_POOLS = ("", "avg")


def _check_global_pool(owner: str, name: str, value: Any) -> None:
    if value not in GLOBAL_POOLS:
        raise ValueError(f"{owner}: {name} must be '' or 'avg', got {value!r}")


def _optional(check: Callable[..., Any]) -> Callable[[str, str, Any], None]:
    def run(owner: str, name: str, value: Any) -> None:
        if value is not None:
            check(owner, name, value)

    return run


# Constructor arguments shared by the families, by name: each rule raises TypeError/ValueError naming the argument.
_RULES: dict[str, Callable[[str, str, Any], Any]] = {
    "in_chans": check_int,
    "num_classes": lambda owner, name, value: check_int(owner, name, value, minimum=0),
    "embed_dim": check_int,
    "depth": check_int,
    "num_heads": check_int,
    "kernel_size": lambda owner, name, value: check_int(owner, name, value, minimum=2),
    "mlp_ratio": lambda owner, name, value: check_real(owner, name, value, positive=True),
    "qkv_bias": check_bool,
    "qk_scale": _optional(check_real),
    "layer_scale": _optional(lambda owner, name, value: check_real(owner, name, value, positive=True)),
    "drop_rate": check_rate,
    "proj_drop_rate": check_rate,
    "attn_drop_rate": check_rate,
    "drop_path_rate": check_rate,
    "global_pool": _check_global_pool,
    "clamp_dilation": check_bool,
}


def check_model_args(owner: str, **args: Any) -> None:
    """Checks constructor arguments by their names (``in_chans``, ``num_classes``, ``drop_path_rate``, ...).

    Raises:
        TypeError: A value of the wrong type.
        ValueError: A value out of range.
    """
    for name, value in args.items():
        _RULES[name](owner, name, value)


def check_int_sequence(owner: str, name: str, value: Any, length: int | None = None, minimum: int = 1) -> list[int]:
    """A list or tuple of ints ``>= minimum`` (of `length` entries when given), returned as a list."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise TypeError(f"{owner}: {name} must be a list or tuple of ints, got {type(value).__name__} {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{owner}: {name} must have {length} entries, got {len(value)} ({list(value)})")
    if not value:
        raise ValueError(f"{owner}: {name} must not be empty")
    return [check_int(owner, f"{name}[{i}]", v, minimum) for i, v in enumerate(value)]


@torch.fx.wrap
def _checked_image(x: torch.Tensor, owner: str, in_chans: int, size: tuple[int, int] | None) -> torch.Tensor:
    """`x` after checking it is ``[B, in_chans, H, W]`` (with ``(H, W) == size`` when given)."""
    if x.dim() != 4 or x.shape[1] != in_chans or (size is not None and tuple(x.shape[2:]) != tuple(size)):
        want = f"[B, {in_chans}, {size[0]}, {size[1]}] (fixed input size)" if size else f"[B, {in_chans}, H, W]"
        raise ValueError(f"{owner}: x must be {want}, got {tuple(x.shape)}")
    return x


class NATBase(nn.Module):
    """The timm model interface of every NAT family: classifier head, weight init, weight-decay exemptions and the
    pretrained-weights hook.

    Subclasses build their trunk, then call :meth:`_init_head` and :meth:`init_weights`, and implement
    ``forward_features`` (channels-last ``[B, H, W, C]``), ``forward_intermediates``, ``group_matcher`` and
    ``set_grad_checkpointing``. A family whose checkpoints need key work sets ``checkpoint_filter`` to its
    ``checkpoint_filter_fn``; :func:`natzoo.models.load_weights` applies it.
    """

    checkpoint_filter: Callable[[StateDict, nn.Module], StateDict] | None = None
    output_fmt = "NHWC"
    in_chans: int  # set by every subclass
    forward_features: Callable[[torch.Tensor], torch.Tensor]  # implemented by every subclass

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = num_features
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """`x` after checking its layout (traced as one call by torch.fx)."""
        return _checked_image(x, type(self).__name__, self.in_chans, size)

    def init_weights(self) -> None:
        """Truncated normal (std 0.02) for every Linear with zero bias, LayerNorm 1/0; convolutions keep PyTorch's
        default and attention ``rpb`` its own truncated normal."""
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self, include_rpb: bool = True) -> set[str]:
        """Parameter names exempt from weight decay: biases, norms, layer-scale gammas and (by default) ``rpb``.

        The official ImageNet recipe decayed ``rpb`` (the timm version it used ignored the models' no-decay
        keywords, see docs/models.md); pass ``include_rpb=False`` to reproduce that. The detection recipes exempt it.
        """
        names = set()
        for name, param in self.named_parameters():
            is_rpb = name.endswith("attn.rpb")
            if (is_rpb and include_rpb) or (not is_rpb and param.ndim <= 1):
                names.add(name)
        return names

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the head by a new ``nn.Linear`` with `num_classes` outputs (0: Identity)."""
        owner = type(self).__name__
        check_model_args(owner, num_classes=num_classes)
        if global_pool is not None:
            check_model_args(owner, global_pool=global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, H, W, C]`` features -> logits ``[B, num_classes]`` (or the pooled features with `pre_logits`)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, checkpoint_path: str | Mapping[str, Any]) -> None:
        """timm's hook for pretrained weights (the families' cfgs set ``custom_load``): loads through
        :func:`natzoo.models.load_weights`.

        The head is kept when the file's fits ``num_classes``, re-initialised (with a log line) when it does not;
        for ``in22k`` tags built with the cfg's class count, whose head size is only known from the file, the head
        takes the file's class count. EMA weights are preferred when the file holds both, as timm does.
        """
        cfg = getattr(self, "pretrained_cfg", None) or {}
        adopt = cfg.get("tag") == "in22k" and self.num_classes == cfg.get("num_classes")
        load_weights(self, checkpoint_path, head="adopt" if adopt else "auto", use_ema=True)


def _init_weights(module: nn.Module) -> None:
    if any(p.is_meta for p in module.parameters(recurse=False)):
        return  # shape-only model: random init is meaningless there and slow on the meta device
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def pretrained_cfg(url: str, first_conv: str, reduction: int, **kwargs: Any) -> dict[str, Any]:
    """timm pretrained-cfg fields shared by every family; `kwargs` add or override fields.

    ``pool_size`` is the unpooled feature map at ``input_size`` (side ``ceil(S / reduction)``). ``custom_load`` makes
    timm hand local files to :meth:`NATBase.load_pretrained`.
    """
    cfg = {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": "head",
        "custom_load": True,
        "license": "mit",
        "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
        **kwargs,
    }
    cfg["pool_size"] = tuple(math.ceil(side / reduction) for side in cfg["input_size"][1:])
    return cfg


def cycle(pattern: Sequence[Any], length: int) -> tuple[Any, ...]:
    """`pattern` repeated to `length` entries: ``cycle([1, 8, 1], 2) == (1, 8)``."""
    return tuple(pattern[j % len(pattern)] for j in range(length))


def variant_args(model_args: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A variant's constructor arguments overridden by the caller's.

    A variant's dilation pattern follows overridden depths when the caller gives no dilations of their own: per
    stage for ``depths`` (``[1, 8, 1]`` at depth 2 is ``[1, 8]``), per block for ``depth``.
    """
    args = {**model_args, **kwargs}
    pattern = model_args.get("dilations")
    if pattern is None or "dilations" in kwargs:
        return args
    depths = kwargs.get("depths")
    if isinstance(depths, Sequence) and len(depths) == len(pattern) and all(isinstance(d, int) for d in depths):
        args["dilations"] = tuple(cycle(stage, depth) for stage, depth in zip(pattern, depths))
    elif isinstance(kwargs.get("depth"), int) and kwargs["depth"] > 0:
        args["dilations"] = cycle(pattern, kwargs["depth"])
    return args
