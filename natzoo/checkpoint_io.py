"""Checkpoint IO that writes atomically in the destination directory and loads with ``weights_only=True``.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the system
temp directory; when that is another filesystem the final move is a copy, so a crash can leave a truncated
checkpoint. Here the temporary file is a sibling of the destination, flushed and fsynced, then ``os.replace``d.

The temporary file has a scratch name of :mod:`natzoo.ownership` (``.<name>.natzoo-tmp.<host>.<pid>.<random>.tmp``):
a failed save deletes it, and one left by a killed process is deleted by the next save or load in that directory.
A full disk is reported as such (``OSError`` with ``errno.ENOSPC`` naming the checkpoint), not as the serializer's
internal error; the file at the destination, and every other checkpoint, stay as they were.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from natzoo.ownership import scratch_prefix, sweep_abandoned

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


def _disk_full(exc: BaseException) -> bool:
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
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix(os.path.basename(path), "tmp"), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
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
