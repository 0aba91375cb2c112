"""torch.hub entry points for every registered NAT-family model.

Example:
    >>> model = torch.hub.load("/path/to/natzoo", "nat_tiny", source="local", pretrained=True)
    >>> model = torch.hub.load("/path/to/natzoo", "dinat_mini", source="local", checkpoint="pytorch_model.bin")

``checkpoint=PATH`` loads a local official ``.pth`` or HF ``pytorch_model.bin``/``model.safetensors`` (the same as
``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)``, through ``natzoo.models.load_weights``: the file's
classifier is kept when it fits ``num_classes`` and re-initialised, with a warning, when it does not); other keyword
arguments go to ``timm.create_model``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import timm
from torch import nn

from natzoo import models

dependencies = ["torch", "timm"]


def _entry(name: str) -> Callable[..., nn.Module]:
    def entry(
        pretrained: bool = False, checkpoint: str | os.PathLike[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        if checkpoint is not None:
            overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=os.fspath(checkpoint))
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return timm.create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"timm.create_model({name!r}, ...); pass checkpoint=PATH to load a local weights file."
    return entry


for _name in models.registered_models():
    globals()[_name] = _entry(_name)
