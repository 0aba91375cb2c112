"""Shared test setup: deterministic seeds, IEEE fp32 products, NaN-filled allocations on request."""

from __future__ import annotations

import os
import sys

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be on before anything imports
# triton.language (timm, torchvision and lightning all do, at collection time): its @jit helpers are built then.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def nan_empty(monkeypatch):
    """Makes ``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty`` return NaN-filled floating buffers.

    Kernels that leave part of an output unwritten then fail the no-NaN assertions instead of passing by luck.
    """
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(real_new_empty(self, *a, **k)))
    yield


def pytest_collection_modifyitems(config, items):
    """GPU tests run only with a CUDA device; they are skipped with the reason otherwise."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
