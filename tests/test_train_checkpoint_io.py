"""Atomic checkpoint writes and weights-only loads."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from natzoo.checkpoint_io import AtomicCheckpointIO, atomic_torch_save


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
