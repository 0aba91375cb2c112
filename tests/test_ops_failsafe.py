"""Backend choice and the GPU fail-safes, driven on CPU.

GPU-only branches (compute capability, device guard) run against ``unittest.mock.create_autospec`` stand-ins of the
``torch.cuda`` functions, so a misspelt or wrongly called CUDA API fails here; the kernels themselves run in Triton's
interpreter (conftest turns it on without a GPU).
"""

from __future__ import annotations

import logging
import warnings
from unittest import mock

import pytest
import torch
from natzoo.ops.neighborhood import dense, dispatch
from natzoo.ops.neighborhood.dispatch import select_backend, use_backend
from natzoo.ops.neighborhood.validation import Problem
from oracle import dense_na

from natzoo import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(device="cuda:0", dtype=torch.bfloat16, heads=2, head_dim=32, batch=2, spatial=(14, 14)) -> Problem:
    return Problem("na2d", 2, batch, spatial, heads, head_dim, (7, 7), (1, 1), (1, 1), (False, False),
                   head_dim**-0.5, dtype, torch.device(device))


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen compute capability, through autospecced torch.cuda functions."""
    dispatch._capability.cache_clear()
    dispatch._warn_once.cache_clear()

    def use(capability):
        monkeypatch.setattr(torch.cuda, "is_available", mock.create_autospec(torch.cuda.is_available,
                                                                           return_value=True))
        cap = mock.create_autospec(torch.cuda.get_device_capability, return_value=capability)
        monkeypatch.setattr(torch.cuda, "get_device_capability", cap)
        monkeypatch.setattr(torch.cuda, "current_device", mock.create_autospec(torch.cuda.current_device,
                                                                             return_value=0))
        monkeypatch.setattr(dispatch, "triton_importable", lambda: True)
        return cap

    yield use
    dispatch._capability.cache_clear()
    dispatch._warn_once.cache_clear()


def test_supported_gpu_runs_triton(fake_gpu):
    cap = fake_gpu((9, 0))
    assert select_backend(_problem(), None) == "triton"
    cap.assert_called_once_with(0)


def test_old_gpu_auto_falls_back_to_dense_with_one_warning(fake_gpu):
    fake_gpu((7, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_backend(_problem(), None) == "dense"
        assert select_backend(_problem(), "auto") == "dense"
        # A problem too large for the dense bias goes to the reference instead (no second warning).
        assert select_backend(_problem(spatial=(160, 160)), None) == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "compute capability >= 8.0, cuda:0 has 7.5" in messages[0] and "backend=" in messages[0]


def test_old_gpu_forced_triton_raises(fake_gpu):
    fake_gpu((7, 0))
    with pytest.raises(RuntimeError, match=r"backend='triton' asks for the Triton backend, but the Triton kernels "
                                           r"need compute capability >= 8.0, cuda:0 has 7.0; use backend='dense'"):
        select_backend(_problem(), "triton")
    assert select_backend(_problem(), "dense") == "dense"


def test_heads_beyond_the_grid_axis_are_refused(fake_gpu):
    fake_gpu((9, 0))
    assert "heads=70000 exceeds 65535" in dispatch.triton_unsupported_reason(_problem(heads=70000))
    assert select_backend(_problem(heads=70000, spatial=(7, 7)), None) == "reference"


def test_batch_is_folded_into_grid_axis_0():
    """Any batch fits: the grid is (tiles * batch, heads, 1), within the 2**31 - 1 / 65535 / 65535 limits."""
    from natzoo.ops.neighborhood.triton.forward import Geometry, launch_grid

    geo = Geometry.of(_problem(batch=70000))
    grid = launch_grid(geo, (2, 8, 1), 70000, 16)
    assert grid == (geo.num_tiles((2, 8, 1)) * 70000, 16, 1)
    assert grid[0] < 2**31 and grid[1] <= 65535 and grid[2] == 1


def test_dropout_goes_to_the_reference_and_forced_kernels_refuse_it(caplog):
    problem = _problem(device="cpu", dtype=torch.float32)
    with caplog.at_level(logging.DEBUG, logger="natzoo.ops.neighborhood"):
        assert select_backend(problem, None, dropout_p=0.1) == "reference"
    assert "reference backend (dropout_p=0.1)" in caplog.text
    for name in ("triton", "dense"):
        with pytest.raises(ValueError, match=rf"backend='{name}' asks for the (?i:{name}) backend, which has no attention "
                                             r"dropout \(dropout_p=0.1\)"):
            select_backend(problem, name, dropout_p=0.1)
    module = ops.NeighborhoodAttention1D(16, 2, 3, attn_drop=0.5).train()
    x = torch.randn(1, 9, 16)
    with use_backend("triton"), pytest.raises(ValueError, match=r"use_backend\('triton'\).*no attention dropout"):
        module(x)
    assert module.eval()(x).shape == x.shape  # eval: no dropout, any backend


def test_dense_is_selectable_three_ways(caplog, monkeypatch):
    q = torch.randn(1, 9, 2, 8, dtype=torch.float64)
    want = dense_na(q, q, q, 3)[0]
    with caplog.at_level(logging.DEBUG, logger="natzoo.ops.neighborhood"):
        torch.testing.assert_close(ops.na1d(q, q, q, 3, backend="dense"), want)
        with use_backend("dense"):
            torch.testing.assert_close(ops.na1d(q, q, q, 3), want)
        monkeypatch.setenv("NATZOO_NA_BACKEND", "dense")
        torch.testing.assert_close(ops.na1d(q, q, q, 3), want)
    assert caplog.text.count("dense backend") == 3
    assert "NATZOO_NA_BACKEND=dense" in caplog.text and "use_backend('dense')" in caplog.text


def test_dense_refuses_an_oversized_bias(monkeypatch):
    monkeypatch.setattr(dense, "MAX_ELEMENTS", 500)
    q = torch.randn(1, 40, 2, 8)
    bias = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"backend='dense' asks for the dense backend, which cannot run this problem: "
                                         r"its heads x N x N bias would hold 3,200 elements"):
        ops.na1d(q, q, q, 3, rpb=bias, backend="dense")
    with pytest.raises(ValueError, match=r"return_lse needs the B x heads x N x N scores"):
        ops.na1d(q[:, :20], q[:, :20], q[:, :20], 3, return_lse=True, backend="dense")


def test_fp32_precision_query_follows_both_torch_apis():
    """torch.get_float32_matmul_precision() raises once the new fp32_precision API was used; the kernels' query
    must not, and must follow the new setting."""
    from natzoo.ops.neighborhood.triton.forward import dot_precision

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert dot_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert dot_precision(torch.float32) == "ieee"
        assert dot_precision(torch.bfloat16) == "tf32"
    finally:
        matmul.fp32_precision = before
        torch.set_float32_matmul_precision("highest")
    assert dot_precision(torch.float32) == "ieee"


def test_device_guard_uses_the_inputs_gpu(monkeypatch):
    from natzoo.ops.neighborhood.triton import tiling

    guard = mock.create_autospec(torch.cuda.device)
    monkeypatch.setattr(torch.cuda, "device", guard)
    tiling.device_guard(torch.device("cuda", 1))
    guard.assert_called_once_with(torch.device("cuda", 1))
    with tiling.device_guard(torch.device("cpu")):
        pass
    guard.assert_called_once()


def test_launch_failure_names_kernel_config_shape_dtype_and_way_out(monkeypatch):
    from natzoo.ops.neighborhood.triton import forward

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PassManager::run failed")

            return launch

    monkeypatch.setattr(forward, "tuned", lambda *args, **kwargs: Broken())
    q = torch.randn(1, 9, 2, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"na1d: the Triton forward kernel failed \(RuntimeError: PassManager::run "
                                           r"failed\); config .*B=1, spatial=\(9,\), heads=2, head_dim=16.*"
                                           r"dtype=torch.float32.*backend='dense' or backend='reference'") as info:
        ops.na1d(q, q, q, 3, backend="triton")
    assert type(info.value).__name__ == "KernelLaunchError"


@pytest.mark.slow  # the interpreter at 64-bit offsets: about 7 s
def test_int64_offset_path_matches_the_oracle(monkeypatch):
    """The 64-bit offset variant (WIDE, taken for tensors of 2**31+ elements) forced on a small problem."""
    if DEVICE == "cuda":
        pytest.skip("interpreter check; on a GPU the offsets follow the tensor sizes")
    from natzoo.ops.neighborhood.triton import backward, forward

    monkeypatch.setattr(forward, "narrow_offsets", lambda *tensors: False)
    monkeypatch.setattr(backward, "narrow_offsets", lambda *tensors: False)
    q, k, v = (torch.randn(2, 5, 6, 2, 16, requires_grad=True) for _ in range(3))
    rpb = (torch.randn(2, 5, 5) * 0.5).requires_grad_()
    out = ops.na2d(q, k, v, 3, dilation=(1, 2), rpb=rpb, backend="triton")
    grads = torch.autograd.grad(out.square().sum(), [q, k, v, rpb])
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
    ref_out = dense_na(*ref[:3], 3, 1, (1, 2), rpb=ref[3])[0]
    ref_grads = torch.autograd.grad(ref_out.square().sum(), ref)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
