"""Atomic checkpoint writes, full disks, leftovers of killed saves, and weights-only loads."""

from __future__ import annotations

import errno
import os
import pickle
import re
import signal

import pytest
import torch

from natzoo.checkpoints import AtomicCheckpointIO, atomic_torch_save
from natzoo.ownership import scratch_prefix


class _Boom:
    def __reduce__(self):
        raise RuntimeError("serialisation failed half-way")


class _Arbitrary:
    """A pickled object that is not a tensor/primitive: weights_only loading must refuse it."""


def test_failed_save_keeps_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="half-way"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3), "bad": _Boom()}, path)
    assert io.load_checkpoint(path)["step"] == 1
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_saved_file_has_normal_permissions(tmp_path):
    path = tmp_path / "a.ckpt"
    atomic_torch_save({"x": torch.zeros(1)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_load_is_weights_only(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"obj": _Arbitrary()}, path)
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(path)


class _DiskFullAfter:
    """A file object whose writes fail with ENOSPC once ``limit`` bytes have been written."""

    def __init__(self, f, limit: int):
        self._f, self._left = f, limit

    def write(self, data) -> int:
        if len(data) > self._left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _fail_writes(monkeypatch) -> None:
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _DiskFullAfter(real(fd, *a, **k), limit=200))


def _fail_fsync(monkeypatch) -> None:
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("inject", [_fail_writes, _fail_fsync], ids=["write", "fsync"])
def test_full_disk_is_reported_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, inject):
    path = tmp_path / "ckpt" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    inject(monkeypatch)
    with pytest.raises(OSError, match=f"No space left on device while saving checkpoint {re.escape(str(path))}") as err:
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_full_disk_during_training_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    class FullDiskAtEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                _fail_writes(monkeypatch)

    ckpt_dir = tmp_path / "checkpoints"
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                         callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_top_k=1, save_last=True),
                                    FullDiskAtEpoch()])
    with pytest.raises(OSError, match=r"No space left on device while saving checkpoint .*epoch=1"):
        trainer.fit(BoringModel())
    monkeypatch.undo()
    assert sorted(os.listdir(ckpt_dir)) == ["epoch=0-step=2.ckpt", "last.ckpt"]  # epoch 0's files, no temporary file
    for name in ("epoch=0-step=2.ckpt", "last.ckpt"):
        assert AtomicCheckpointIO().load_checkpoint(ckpt_dir / name)["global_step"] == 2


def _killed_while_saving(path) -> None:
    """A forked child saves to ``path`` and is killed (SIGKILL) at the fsync: its temporary file stays behind."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        try:
            os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
            atomic_torch_save({"step": 99, "w": torch.ones(4)}, path)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _save_again(path) -> None:
    atomic_torch_save({"step": 2}, path.with_name("other.ckpt"))


def _resume_from(path) -> None:
    assert AtomicCheckpointIO().load_checkpoint(path)["step"] == 1


@pytest.mark.parametrize("next_run", [_save_again, _resume_from], ids=["save", "load"])
def test_temporary_file_of_a_killed_save_is_removed_by_the_next_run(tmp_path, next_run):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    _killed_while_saving(path)
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(leftovers) == 1 and ".natzoo-tmp." in leftovers[0]
    # Not provably an abandoned natzoo write: a user's file, an older natzoo's name, a running process's file.
    kept = [".last.ckpt.tmp", ".last.ckpt.a1b2c3.tmp", scratch_prefix("last.ckpt", "tmp") + "abcd1234.tmp"]
    for name in kept:
        (tmp_path / name).write_bytes(b"keep")
    next_run(path)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".tmp")) == sorted(kept)
    assert torch.load(path, weights_only=True)["step"] == 1
