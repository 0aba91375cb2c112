"""The network's weights inside this project's Lightning checkpoints (a training-layer key convention).

A LightningModule holding its network as ``self.model`` writes it under ``model.`` in the checkpoint, and the EMA
copy (classification with ``ema.enabled``) under ``model_ema.module.``. The model layer
(:func:`natzoo.models.load_weights`) knows nothing of that; the task code strips the prefix here first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from natzoo.models import read_state_dict, unwrap_state_dict

__all__ = ["network_weights"]

log = logging.getLogger(__name__)


def network_weights(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any], attr: str = "model", use_ema: bool = False
) -> dict[str, torch.Tensor]:
    """The weights of the network a LightningModule holds as ``self.<attr>``, ready for ``load_weights``.

    Args:
        checkpoint: A Lightning ``.ckpt`` of this project, or any weights file or state dict.
        attr: The LightningModule's attribute holding the network.
        use_ema: Take the EMA copy (``<attr>_ema.module.*``) instead.

    Returns:
        The keys under ``<attr>.`` (or the EMA prefix) without it; a state dict without that prefix (official
        ``.pth``, HF ``.bin``/``.safetensors``, a flat state dict) unchanged.

    Raises:
        ValueError: `use_ema` is set but the checkpoint holds no EMA copy.
    """
    state = unwrap_state_dict(checkpoint) if isinstance(checkpoint, Mapping) else read_state_dict(checkpoint)
    prefix = f"{attr}_ema.module." if use_ema else f"{attr}."
    selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if use_ema and not selected:
        raise ValueError(f"use_ema: the checkpoint holds no EMA weights (no keys under {prefix!r}; it was trained "
                         "without EMA or is not a Lightning checkpoint of this project)")
    if not selected:
        return state
    if len(selected) < len(state):
        log.info("using the %d tensors under %r (%d others in the checkpoint ignored)", len(selected), prefix,
                 len(state) - len(selected))
    return selected
