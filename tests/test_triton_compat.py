"""The version range and the private Triton API behind ``ops/neighborhood/triton/compat.py``.

Run by the main suite (today's torch/Triton) and by ``.ci/matrix`` under every other supported pair, so a Triton
release that moves one of the internals fails here, naming it.
"""

from __future__ import annotations

import importlib.metadata
import warnings

import pytest
import torch
import triton
import triton.language as tl
from natzoo.ops.neighborhood.dispatch import interpreter_enabled
from natzoo.ops.neighborhood.triton import backward, compat, forward, tiling
from natzoo.ops.neighborhood.validation import Problem

from natzoo import ops

KERNELS = [forward._na_fwd_kernel, backward._na_bwd_dq_kernel, backward._na_bwd_dkdv_kernel]
needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="runs kernels in Triton's CPU interpreter")


@pytest.fixture
def fresh_version_check():
    compat.check_versions.cache_clear()
    yield
    compat.check_versions.cache_clear()


def test_release_reads_major_minor():
    assert compat.release("2.11.0+cu130") == (2, 11)
    assert compat.release("3.9.0rc1") == (3, 9)
    assert compat.release("10.0") == (10, 0)
    with pytest.raises(ValueError, match="version must start with"):
        compat.release("nightly")


def test_this_environment_is_a_tested_one():
    """Every environment CI runs (the main suite's and each matrix pair's) lies in the declared range."""
    assert compat.untested_versions() == []


@pytest.mark.parametrize("torch_version,triton_version,expected", [
    ("2.11.0+cu130", "3.6.0", []),
    ("2.14.1", "3.9.0", []),
    ("2.10.0", "3.8.0", ["torch 2.10.0 (tested: 2.11 to 2.14.x)"]),
    ("2.15.0", "3.10.0", ["torch 2.15.0 (tested: 2.11 to 2.14.x)", "triton 3.10.0 (tested: 3.6 to 3.9.x)"]),
    ("2.12.0", "3.5.1", ["triton 3.5.1 (tested: 3.6 to 3.9.x)"]),
])
def test_untested_versions(torch_version, triton_version, expected):
    assert compat.untested_versions(torch_version, triton_version) == expected


@needs_interpreter
def test_untested_version_warns_once_before_the_first_launch(monkeypatch, fresh_version_check):
    """Outside the range, the first Triton forward warns once, naming the versions, the range and backend='dense',
    before anything reaches Triton: here Triton's autotuner then fails the way 3.9 did with the shared key."""
    monkeypatch.setattr(torch, "__version__", "2.15.0")
    monkeypatch.setattr(triton, "__version__", "3.10.0")

    def failing_autotune(*args, **kwargs):
        raise ValueError("key contains names that are not kernel arguments")

    monkeypatch.setattr(tiling.triton, "autotune", failing_autotune)
    tiling._autotuned.cache_clear()
    q, k, v = (torch.randn(1, 9, 1, 16) for _ in range(3))
    try:
        with pytest.warns(compat.UntestedVersionWarning) as record, pytest.raises(ValueError, match="key contains"):
            ops.na1d(q, k, v, 3, backend="triton")
        monkeypatch.undo()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ops.na1d(q, k, v, 3, backend="triton")  # the real kernel now: no second warning
    finally:
        tiling._autotuned.cache_clear()
    assert len(record) == 1
    message = str(record[0].message)
    for part in ("torch 2.15.0", "triton 3.10.0", "torch 2.11 to 2.14.x", "Triton 3.6 to 3.9.x", "backend='dense'"):
        assert part in message, (part, message)


@needs_interpreter
def test_tested_versions_do_not_warn(monkeypatch, fresh_version_check):
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    q, k, v = (torch.randn(1, 9, 1, 16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.na1d(q, k, v, 3, backend="triton")


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: compat.python_function(k).__name__)
def test_each_autotuner_is_keyed_on_its_own_arguments(kernel):
    """Triton 3.9 rejects an autotune key that names anything but the kernel's arguments."""
    tuner = tiling.tuned(kernel, "fwd", 2, "quick", 32)
    arguments = set(compat.arg_names(kernel))
    assert tuner.keys and set(tuner.keys) <= arguments
    assert set(tuner.keys) == set(tiling.AUTOTUNE_KEY) & arguments
    assert {"B", "H", "L0", "HEAD_DIM", "K0", "PRECISION"} <= set(tuner.keys)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: compat.python_function(k).__name__)
def test_kernels_are_found_through_their_module(kernel):
    key = compat.kernel_key(kernel)
    assert key.startswith("natzoo.ops.neighborhood.triton.")
    found = compat.jit_function(key)
    assert found is compat.unwrap(kernel) and compat.python_function(found) is compat.python_function(kernel)
    assert "constexpr" not in compat.arg_names(kernel)[0]
    assert {"TQ0", "TK2"} <= set(compat.constexpr_names(kernel)) < set(compat.arg_names(kernel))
    with pytest.raises(LookupError, match="no Triton kernel"):
        compat.jit_function("natzoo.ops.neighborhood.triton.forward:na_forward")


def test_launches_are_recorded_instead_of_run():
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.run
    problem = Problem("na2d", 2, 1, (9, 10), 2, 32, (3, 3), (1, 1), (2, 1), (False, False), 32**-0.5,
                      torch.bfloat16, torch.device("meta"))
    q, k, v = (torch.empty(1, 9, 10, 2, 32, dtype=torch.bfloat16, device="meta") for _ in range(3))
    seen = []
    with compat.intercepted_launches(lambda *launch: seen.append(launch)):
        forward.na_forward(problem, q, k, v, None)
    assert Autotuner.run is original
    [(kernel, args, kwargs, configs, grid)] = seen
    assert compat.python_function(kernel) is compat.python_function(forward._na_fwd_kernel)
    assert args[0] is q and kwargs["HAS_RPB"] is False and "grid" not in kwargs
    assert configs and all(isinstance(c, triton.Config) for c in configs)
    tiles = configs[0].kwargs
    assert grid({**kwargs, **tiles})[1] == 2  # heads on grid axis 1


def test_compilation_listener_chains_and_restores():
    from triton import knobs

    calls = []
    previous = knobs.compilation.listener
    knobs.compilation.listener = lambda **event: calls.append(("outer", event["cache_hit"]))
    try:
        with compat.compilation_listener(lambda **event: calls.append(("inner", event["cache_hit"]))):
            knobs.compilation.listener(src=None, metadata={}, metadata_group={}, times=None, cache_hit=True)
        assert calls == [("outer", True), ("inner", True)]
        knobs.compilation.listener(src=None, metadata={}, metadata_group={}, times=None, cache_hit=False)
        assert calls[-1] == ("outer", False)
    finally:
        knobs.compilation.listener = previous


def test_mock_tensor_carries_dtype_and_pointer():
    stand_in = compat.mock_tensor(torch.bfloat16, 48)
    assert stand_in.dtype == torch.bfloat16 and stand_in.data_ptr() == 48


@triton.jit
def _count_trips(OUT, n):
    total = 0
    for _ in range(n):
        total += 1
    tl.store(OUT, total)


@needs_interpreter
def test_interpreter_takes_a_runtime_loop_bound():
    """Triton 3.6's interpreter needs the patch (NumPy >= 2.4 refuses its one-element scalars as range bounds)."""
    assert compat.patch_interpreter_scalars() is (compat.release(importlib.metadata.version("triton")) < (3, 7))
    out = torch.zeros(1, dtype=torch.int32)
    _count_trips[(1,)](out, 5)
    assert out.item() == 5
