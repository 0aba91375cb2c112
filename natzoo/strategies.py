"""Strategy factories for Hydra configs (Lightning strategies whose arguments are not plain values)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

__all__ = ["fsdp_strategy"]


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
