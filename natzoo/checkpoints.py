"""Lightning checkpoints of natzoo runs: written atomically, read without running code, and the network inside.

* Writing (:class:`AtomicCheckpointIO`, installed by :mod:`natzoo.run.training`). Lightning's ``TorchCheckpointIO``
  writes through an fsspec transaction whose temporary file lives in the system temp directory; when that is another
  filesystem the final move is a copy, so a crash can leave a truncated checkpoint. Here the temporary file is a
  sibling of the destination, flushed and fsynced, then ``os.replace``d. It has a scratch name of
  :mod:`natzoo.ownership` (``.<name>.natzoo-tmp.<host>.<pid>.<random>.tmp``): a failed save deletes it, and one left
  by a killed process is deleted by the next save or load in that directory. A full disk is reported as such
  (``OSError`` with ``errno.ENOSPC`` naming the checkpoint), not as the serializer's internal error; the file at the
  destination, and every other checkpoint, stay as they were.
* Resolving ``ckpt_path=`` (:func:`resolve_ckpt_path`, the one place that turns the config value into a file):
  ``last`` finds the newest ``last.ckpt`` (:func:`find_last_checkpoint`), the file is read once
  (:func:`read_lightning_checkpoint`: clear errors for files that are missing, empty, a directory or another kind of
  file, and no pickled code ever run, ``weights_only=True``) and comes back as a :class:`CheckpointInfo` with its
  hyper-parameters, epoch, step and the run directory that wrote it (:func:`run_dir_of_checkpoint`).
* The network inside (:func:`network_weights`): a LightningModule holding its network as ``self.model`` writes it
  under ``model.``, and the EMA copy (classification with ``ema.enabled``) under ``model_ema.module.``. The model
  layer (:func:`natzoo.models.load_weights`) knows nothing of that training-layer convention; the task code strips
  the prefix here first.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from natzoo.models import read_state_dict, unwrap_state_dict
from natzoo.ownership import sweep_abandoned, write_atomically

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointInfo",
    "atomic_torch_save",
    "differences",
    "find_last_checkpoint",
    "lightning_hyper_parameters",
    "network_weights",
    "read_lightning_checkpoint",
    "resolve_ckpt_path",
    "run_dir_of_checkpoint",
]

log = logging.getLogger(__name__)


def _disk_full(exc: BaseException | None) -> bool:
    # torch.save reports a failed write of its zip stream as a RuntimeError whose context holds the OSError.
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_bytes(directory: str) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then ``os.replace`` onto ``path``.

    Temporary files that killed natzoo processes left in the directory are removed first.

    Raises:
        OSError: ``errno.ENOSPC`` when the disk (or quota) is full, naming ``path``; the previous file at ``path`` is
            unchanged and the temporary file removed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    sweep_abandoned(Path(directory), "tmp")
    try:
        write_atomically(path, lambda handle: torch.save(obj, handle), "wb", fsync=True)
    except BaseException as exc:
        if _disk_full(exc):
            raise OSError(errno.ENOSPC, f"No space left on device while saving checkpoint {path} "
                          f"({_free_bytes(directory)}); the file previously at that path and the other checkpoints "
                          "are unchanged; free some space and retry", path) from exc
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local saves and ``weights_only=True`` loads by default."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Saves atomically for local paths; remote (fsspec URL) paths fall back to Lightning's implementation."""
        if "://" in os.fspath(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint does not take storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: _PATH, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Loads with ``weights_only=True`` unless the caller explicitly passes ``False``; for a local path, first
        removes the temporary files killed natzoo processes left next to it."""
        if "://" not in os.fspath(path):
            sweep_abandoned(Path(os.path.abspath(path)).parent, "tmp")
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=True if weights_only is None else weights_only)


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
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, IndexError, KeyError, TypeError) as err:
        # a text file makes the weights-only unpickler fail with IndexError ("list index out of range")
        raise ValueError(f"{where} cannot be read as a PyTorch checkpoint ({type(err).__name__}: {err}); "
                         f"{_HINT}") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= checkpoint.keys():
        raise ValueError(f"{where} is not a Lightning checkpoint: it holds {_describe(checkpoint)}, without the "
                         f"'state_dict' and 'pytorch-lightning_version' entries; {_HINT}")
    return checkpoint


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


def find_last_checkpoint(search_root: str | os.PathLike) -> Path | None:
    """Newest ``last*.ckpt`` under ``search_root/**/checkpoints/`` (by modification time), or None."""
    pattern = os.path.join(glob.escape(str(search_root)), "**", "checkpoints", "last*.ckpt")
    found = [Path(p) for p in glob.glob(pattern, recursive=True)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _locate(value: Any, resume_dir: str | os.PathLike | None) -> Path | None:
    if value in (None, "", "null"):
        return None
    if str(value) != "last":
        return Path(str(value))
    return find_last_checkpoint(resume_dir) if resume_dir else None


def run_dir_of_checkpoint(ckpt_path: str | None, resume_dir: str | os.PathLike | None) -> Path | None:
    """The run directory a resumed run continues in: for ``ckpt_path=last`` or a path, the run that wrote the
    checkpoint (``<run dir>/checkpoints/<file>``, with Hydra's ``.hydra`` record); None for a fresh run or a
    checkpoint from elsewhere."""
    path = _locate(ckpt_path, resume_dir)
    if path is None or path.parent.name != "checkpoints" or not (path.parent.parent / ".hydra").is_dir():
        return None
    return path.parent.parent.resolve()


@dataclass(frozen=True)
class CheckpointInfo:
    """A resolved ``ckpt_path``: the file and what the run needs to know of it, read once.

    Attributes:
        path: The checkpoint file.
        hyper_parameters: The LightningModule's saved arguments (``model_name``, ``optim``, ...).
        epoch: Epochs completed when it was saved, minus one (Lightning's count).
        global_step: Optimizer steps taken when it was saved.
        run_dir: The natzoo run directory that wrote it (None for a checkpoint from elsewhere).
        label_names: The class names the model was trained on, in output order (None when the checkpoint records
            none: written before natzoo recorded them, or by a run without named classes).
    """

    path: str
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    global_step: int = 0
    run_dir: Path | None = None
    label_names: tuple[str, ...] | None = None


def resolve_ckpt_path(value: Any, resume_dir: str | os.PathLike | None = None) -> CheckpointInfo | None:
    """``ckpt_path``: None, a file, or ``last`` (newest ``last.ckpt`` under ``resume_dir``), resolved and read. The
    drivers call it once per run and hand the result to the task (no cache: each call reads the file).

    Args:
        value: The config value.
        resume_dir: Where ``last`` searches (``paths.resume_dir``).

    Returns:
        None without a checkpoint, else its :class:`CheckpointInfo`.

    Raises:
        ValueError: ``last`` finds no checkpoint, or the file is missing, empty, a directory or not a Lightning
            checkpoint (the message names the file and what was expected).
    """
    if value in (None, ""):
        return None
    path = _locate(value, resume_dir)
    if path is None:
        raise ValueError(f"ckpt_path=last: no checkpoints/last.ckpt under {resume_dir}; nothing to resume (start a "
                         "run without ckpt_path, or pass ckpt_path=/path/to/last.ckpt)")
    checkpoint = read_lightning_checkpoint(path)
    return CheckpointInfo(path=str(path), hyper_parameters=dict(checkpoint.get("hyper_parameters") or {}),
                          epoch=int(checkpoint.get("epoch", 0)), global_step=int(checkpoint.get("global_step", 0)),
                          run_dir=run_dir_of_checkpoint(str(path), None),
                          label_names=_recorded_label_names(checkpoint))


def _recorded_label_names(checkpoint: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The class names in a checkpoint's ``natzoo_model`` record (:mod:`natzoo.tools.model_info`), if any."""
    record = checkpoint.get("natzoo_model")
    names = record.get("label_names") if isinstance(record, Mapping) else None
    return tuple(str(n) for n in names) if isinstance(names, (list, tuple)) else None


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for every leaf where two nested mappings differ."""
    found = []
    for key in sorted(set(saved) | set(current), key=str):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            found.extend(differences(old, new, f"{prefix}{key}."))
        elif old != new and not (isinstance(old, (list, tuple)) and isinstance(new, (list, tuple))
                                 and list(old) == list(new)):
            found.append((f"{prefix}{key}", old, new))
    return found


def lightning_hyper_parameters(path: str | os.PathLike) -> dict[str, Any] | None:
    """The saved hyper-parameters when ``path`` is a Lightning checkpoint of a LightningModule, else None (official
    ``.pth``, HF or flat state-dict files, unreadable files: their own loaders report those)."""
    file = Path(path)
    if not file.is_file() or not zipfile.is_zipfile(file):
        return None
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError):
        return None
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        return None
    return dict(checkpoint.get("hyper_parameters") or {})
