"""Loading weight files (official ``.pth``, HF ``.bin``/``.safetensors``, flat state dicts) into timm models."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

import torch
from torch import nn

__all__ = ["read_state_dict", "load_weights", "classifier_prefix"]

log = logging.getLogger(__name__)


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Reads a weights file without unpickling code and returns a flat state dict.

    Uses ``models.load_checkpoint_file`` (official and HF formats, HF keys converted to official ones) when the
    project's models package provides it; otherwise reads safetensors or ``torch.load(weights_only=True)`` and
    unwraps a ``model`` / ``state_dict`` entry and a ``module.`` prefix.

    Raises:
        ValueError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint={str(path)!r} does not exist or is not a file")
    try:
        from natzoo.models import load_checkpoint_file
    except ImportError:
        load_checkpoint_file = None
    if load_checkpoint_file is not None:
        return dict(load_checkpoint_file(str(path)))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def classifier_prefix(model: nn.Module) -> str:
    """Name of the classifier module (timm's ``pretrained_cfg['classifier']``, ``head`` by default)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("classifier", "head") if isinstance(cfg.get("classifier", "head"), str) else "head"


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], allow_new_head: bool, source: str = "") -> bool:
    """Loads ``state`` into ``model`` strictly, except for a classifier whose shape differs.

    Args:
        model: the freshly built network.
        state: flat state dict.
        allow_new_head: when the checkpoint's classifier shape differs from the model's (fine-tuning to another class
            count), keep the model's freshly initialised classifier instead of failing.
        source: file name for messages.

    Returns:
        Whether the classifier was left freshly initialised.

    Raises:
        ValueError: keys are missing or unexpected, or shapes differ outside the classifier (or inside it when
            ``allow_new_head`` is false).
    """
    own = model.state_dict()
    head = classifier_prefix(model) + "."
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    head_mismatch = [k for k in mismatched if k.startswith(head)]
    other_mismatch = [k for k in mismatched if not k.startswith(head)]
    if other_mismatch:
        k = other_mismatch[0]
        raise ValueError(
            f"checkpoint {source}: {len(other_mismatch)} tensors have other shapes than the model, e.g. {k}: "
            f"{tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} in the model (wrong model variant?)"
        )
    new_head = bool(head_mismatch)
    if new_head and not allow_new_head:
        k = head_mismatch[0]
        raise ValueError(
            f"checkpoint {source}: classifier {k} has shape {tuple(state[k].shape)} but the model expects "
            f"{tuple(own[k].shape)}; the checkpoint was trained for another number of classes than the dataset has"
        )
    if new_head:
        state = {k: v for k, v in state.items() if k not in head_mismatch}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if new_head:
        missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {source} does not match the model: missing {missing[:5]} ({len(missing)} in all), "
            f"unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    if new_head:
        shape = tuple(own[head_mismatch[0]].shape)
        log.info("checkpoint %s: classifier %s re-initialised for %s", source, head[:-1], shape)
    return new_head
