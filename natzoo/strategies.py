"""Strategy factories for Hydra configs (Lightning strategies whose arguments are not plain values) and the
memory knob every trainer shares, ``model.grad_checkpointing``."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

__all__ = ["enable_grad_checkpointing", "fsdp_strategy"]


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"trainer.strategy.wrap_modules: cannot import {path!r}: {err}") from err


def fsdp_strategy(wrap_modules: Sequence[str] = ("natzoo.models.nat.NATBlock",), activation_checkpointing: bool = False,
                  **kwargs: Any) -> FSDPStrategy:
    """Lightning ``FSDPStrategy`` wrapping (and optionally checkpointing) the named block classes.

    Args:
        wrap_modules: dotted class paths used as the auto-wrap policy.
        activation_checkpointing: also recompute those blocks' activations in the backward.
        **kwargs: other ``FSDPStrategy`` arguments (``sharding_strategy``, ``state_dict_type``, ...).
    """
    classes = {_import(path) for path in wrap_modules}
    if activation_checkpointing:
        kwargs["activation_checkpointing_policy"] = classes
    return FSDPStrategy(auto_wrap_policy=classes, **kwargs)


def enable_grad_checkpointing(module: nn.Module) -> list[str]:
    """Turns on gradient (activation) checkpointing in every timm model inside ``module`` through the model's own
    ``set_grad_checkpointing`` (NAT families: each block's activations are recomputed in the backward instead of
    kept), for any trainer (single device, DDP, FSDP). EMA copies are left alone (they only run without gradients).

    Returns:
        The names of the submodules it was turned on in (outermost only).

    Raises:
        ValueError: no submodule has ``set_grad_checkpointing`` (the message names the module's class).
    """
    done: list[str] = []
    for name, sub in module.named_modules():
        parts = name.split(".")
        inside_done = any(name.startswith(f"{d}.") for d in done)
        if inside_done or "model_ema" in parts or not callable(getattr(sub, "set_grad_checkpointing", None)):
            continue
        sub.set_grad_checkpointing(True)
        done.append(name)
    if not done:
        raise ValueError(f"model.grad_checkpointing=true: {type(module).__name__} holds no model with "
                         "set_grad_checkpointing() (timm models have it)")
    return done
