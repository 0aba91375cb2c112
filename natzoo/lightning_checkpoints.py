"""Reading the Lightning checkpoints given as ``ckpt_path=``: clear errors for files that are missing, empty, a
directory or another kind of file, and no pickled code ever run (``weights_only=True``)."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_lightning_checkpoint"]

_HINT = ("ckpt_path= takes the Lightning .ckpt files train.py writes (<run dir>/checkpoints/last.ckpt or best.ckpt); "
         "give other weight files (official .pth, HF .bin/.safetensors, plain state dicts) as checkpoint= instead")


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
        if obj and tensors == len(obj):
            return f"a plain state dict of {tensors} tensors"
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        return f"a dictionary with the keys {keys}{', ...' if len(obj) > 6 else ''}"
    return f"a {type(obj).__name__}"


def read_lightning_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> dict[str, Any]:
    """Loads a Lightning checkpoint with ``weights_only=True`` (memory-mapped: tensors are read only when used).

    Args:
        path: the file.
        key: the config key that named it (for messages).

    Returns:
        The checkpoint dictionary (``state_dict``, ``hyper_parameters``, ``epoch``, ``global_step``, ...).

    Raises:
        ValueError: the path is missing, a directory or an empty file, cannot be read as a PyTorch checkpoint, holds
            pickled objects other than tensors and plain values, or is not a Lightning checkpoint. The message names
            the file and what was expected.
    """
    file = Path(path)
    where = f"{key}={str(file)!r}"
    if not file.exists():
        raise ValueError(f"{where} does not exist; {_HINT}")
    if file.is_dir():
        inside = sorted(file.rglob("*.ckpt"))
        example = f" (it holds e.g. {inside[0]})" if inside else ""
        raise ValueError(f"{where} is a directory, not a checkpoint file{example}; {_HINT}")
    if file.stat().st_size == 0:
        raise ValueError(f"{where} is an empty file (0 bytes), not a checkpoint (was a save or a copy interrupted?)")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # weights_only refused a class or function reference
            raise ValueError(f"{where} holds pickled objects other than tensors and plain values; it is not loaded, "
                             f"because unpickling them could run code. {_HINT}") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(err))
        raise ValueError(f"{where} cannot be read as a PyTorch checkpoint "
                         f"({detail.group(1) if detail else str(err).splitlines()[0]}); {_HINT}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{where} cannot be read as a PyTorch checkpoint ({type(err).__name__}: {err}); "
                         f"{_HINT}") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= checkpoint.keys():
        raise ValueError(f"{where} is not a Lightning checkpoint: it holds {_describe(checkpoint)}, without the "
                         f"'state_dict' and 'pytorch-lightning_version' entries; {_HINT}")
    return checkpoint
