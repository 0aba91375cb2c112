"""The tested torch/Triton range and every use of Triton's private API, in one module.

natzoo calls Triton through its public API (``triton.jit``, ``triton.autotune``, ``triton.Config``,
``triton.language``) everywhere except in the tools that build kernels without a GPU or record launches instead of
running them (``benchmarks/triton_aot.py``, the GPU kit's precompile workers). Those need Triton internals that have
no public counterpart; they are all here, each behind a small function, so that a Triton release that moves one
breaks one function, and ``tests/test_triton_compat.py`` (run by ``.ci/matrix`` under every supported Triton) says
which. docs/versions.md lists them.

The module also holds the supported range (:data:`TESTED_TORCH`, :data:`TESTED_TRITON`) and
:func:`check_versions`, which the launchers call before a kernel is first wrapped or launched: outside the range it
warns once, naming the versions, the range and ``backend=`` as the way out.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import re
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton

# Inclusive (major, minor) ranges that .ci/matrix tests (docs/versions.md); pyproject.toml declares the same.
TESTED_TORCH = ((2, 11), (2, 14))
TESTED_TRITON = ((3, 6), (3, 9))


class UntestedVersionWarning(UserWarning):
    """torch or Triton is outside the range natzoo's CI tests (the Triton kernels may fail or be wrong)."""


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``"2.11.0+cu130"`` or ``"3.9.0rc1"``.

    Raises:
        ValueError: `version` does not start with ``<major>.<minor>``.
    """
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"version must start with <major>.<minor>, got {version!r}")
    return int(match.group(1)), int(match.group(2))


def _span(bounds: tuple[tuple[int, int], tuple[int, int]]) -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = bounds
    return f"{lo_major}.{lo_minor} to {hi_major}.{hi_minor}.x"


def untested_versions(torch_version: str | None = None, triton_version: str | None = None) -> list[str]:
    """``"<package> <version> (tested: <range>)"`` for each of torch and Triton outside the tested range.

    Args:
        torch_version: Defaults to the running ``torch.__version__``.
        triton_version: Defaults to the running ``triton.__version__``.
    """
    found = []
    for name, version, bounds in (("torch", torch_version or torch.__version__, TESTED_TORCH),
                                  ("triton", triton_version or triton.__version__, TESTED_TRITON)):
        if not bounds[0] <= release(version) <= bounds[1]:
            found.append(f"{name} {version} (tested: {_span(bounds)})")
    return found


@functools.cache
def check_versions() -> None:
    """Warns once per process (:class:`UntestedVersionWarning`) when torch or Triton is outside the tested range.

    Called by the kernel launchers before the first kernel is wrapped in its autotuner, so the warning comes before
    any error Triton may raise deep inside a launch.
    """
    found = untested_versions()
    if found:
        warnings.warn(
            f"natzoo's Triton kernels are tested with torch {_span(TESTED_TORCH)} and Triton {_span(TESTED_TRITON)}; "
            f"this process has {' and '.join(found)}. They may fail or give wrong results: use backend='dense' (or "
            "'reference'), use_backend('dense') or NATZOO_NA_BACKEND=dense to avoid them, or install a tested "
            "version (docs/versions.md).",
            UntestedVersionWarning,
            stacklevel=3,
        )


@functools.cache
def patch_interpreter_scalars() -> bool:
    """Lets Triton 3.6's CPU interpreter take a runtime scalar as a ``range`` bound under NumPy >= 2.4.

    The interpreter holds every scalar as a one-element array and Triton 3.6 converts it for ``range`` with
    ``int(array)``, which NumPy 2.4 refuses for arrays that are not 0-d, so every kernel loop with a runtime trip
    count fails (``TypeError: only 0-dimensional arrays can be converted to Python scalars``); no kernel-side value
    is 0-d there (reductions give one-element arrays too). Triton 3.7 squeezes the array first; this installs the same
    conversion into 3.6's per-launch patching of ``tl.tensor``. Compiled kernels are not affected.

    Returns:
        Whether the patch was installed (Triton older than 3.7 with the interpreter hook present).
    """
    # The installed distribution's version, not `triton.__version__` (which tests may replace for the range check).
    if release(importlib.metadata.version("triton")) >= (3, 7):
        return False
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


# ---------------------------------------------------------------------------------------------- kernels by name


def python_function(kernel: Any) -> types.FunctionType:
    """The decorated Python function under an ``Autotuner`` / ``Heuristics`` / ``JITFunction`` /
    ``InterpretedFunction`` (each wrapper keeps the wrapped object in ``.fn``)."""
    fn = kernel
    while not isinstance(fn, types.FunctionType):
        fn = fn.fn
    return fn


def arg_names(kernel: Any) -> list[str]:
    """The parameter names of a (possibly wrapped) kernel, in order."""
    return list(inspect.signature(python_function(kernel)).parameters)


def constexpr_names(kernel: Any) -> list[str]:
    """The parameters of a (possibly wrapped) kernel annotated ``tl.constexpr``, in order."""
    params = inspect.signature(python_function(kernel)).parameters
    return [name for name, param in params.items() if "constexpr" in str(param.annotation)]


def kernel_key(kernel: Any) -> str:
    """``"module:qualname"`` of a kernel: what :func:`jit_function` takes back."""
    fn = python_function(kernel)
    return f"{fn.__module__}:{fn.__qualname__}"


def jit_function(key: str) -> Any:
    """The ``JITFunction`` (``InterpretedFunction`` under ``TRITON_INTERPRET=1``) named ``"module:qualname"``.

    Imports the module and unwraps autotuners and heuristics; needs no registry (Triton 3.6 has none).

    Raises:
        LookupError: `key` names no Triton kernel.
    """
    module, _, qualname = key.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    found = unwrap(obj)
    if found is None:
        raise LookupError(f"no Triton kernel named {key!r}")
    return found


def unwrap(kernel: Any) -> Any:
    """The ``JITFunction`` (or ``InterpretedFunction``) under autotuners and heuristics; None if there is none."""
    kinds = _jit_classes()
    while kernel is not None and not isinstance(kernel, kinds):
        kernel = getattr(kernel, "fn", None)
    return kernel


def _jit_classes() -> tuple[type, ...]:
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported Triton has it
        return (JITFunction,)
    return (JITFunction, InterpretedFunction)


# ----------------------------------------------------------------------------------------- launch interception

# record(kernel, args, kwargs, configs, grid)
Recorder = Callable[[Any, tuple, dict, "list[Any] | None", Any], None]


def tuner_configs(tuner: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The configs an ``Autotuner`` launch would benchmark: pruned when there are several, as Triton does."""
    if len(tuner.configs) <= 1:
        return list(tuner.configs)
    tuner.nargs = dict(zip(tuner.arg_names, args))
    try:
        return list(tuner.prune_configs(kwargs))
    finally:
        tuner.nargs = None


@contextlib.contextmanager
def intercepted_launches(record: Recorder) -> Iterator[None]:
    """Inside the block every ``kernel[grid](...)`` launch calls ``record(kernel, args, kwargs, configs, grid)``
    instead of compiling or running anything.

    `kernel` is what the launch wraps (an autotuner's ``fn``, or the ``JITFunction`` / ``InterpretedFunction``
    itself), `kwargs` has ``grid`` and ``warmup`` removed, and `configs` is :func:`tuner_configs` for an autotuned
    launch, None for a plain one. Works for compiled and interpreted kernels alike.
    """
    from triton.runtime.autotuner import Autotuner

    def tuned_run(self: Any, *args: Any, **kwargs: Any) -> None:
        grid = kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        record(self.fn, args, kwargs, tuner_configs(self, args, kwargs), grid)

    def plain_run(self: Any, *args: Any, grid: Any = None, warmup: bool = False, **kwargs: Any) -> None:
        record(self, args, kwargs, None, grid)

    classes: tuple[Any, ...] = (Autotuner, *_jit_classes())
    originals = [(cls, cls.run) for cls in classes]
    for cls in classes:
        cls.run = tuned_run if cls is Autotuner else plain_run
    try:
        yield
    finally:
        for cls, original in originals:
            cls.run = original


# ------------------------------------------------------------------------------------- compiling without a GPU


def mock_tensor(dtype: torch.dtype, data_ptr: int) -> Any:
    """A stand-in tensor for binding a kernel argument: Triton's JIT reads only its dtype and ``data_ptr() % 16``."""
    from triton.runtime.jit import MockTensor

    class _Pointer(MockTensor):
        # MockTensor's data_ptr is a staticmethod; this one returns the recorded pointer
        def data_ptr(self) -> int:  # type: ignore[override]
            return data_ptr

    return _Pointer(dtype)


@contextlib.contextmanager
def compilation_listener(callback: Callable[..., None]) -> Iterator[None]:
    """Calls ``callback(**event)`` after every Triton compilation in the block (``event["cache_hit"]``,
    ``event["src"]``, ``event["times"]``...), after any listener already installed; restores it on exit."""
    from triton import knobs

    previous = knobs.compilation.listener

    def chained(**event: Any) -> None:
        if previous is not None:
            previous(**event)
        callback(**event)

    knobs.compilation.listener = chained
    try:
        yield
    finally:
        knobs.compilation.listener = previous


def current_target() -> tuple[str, Any, int]:
    """``(backend, arch, warp size)`` of the active Triton driver's device."""
    from triton.runtime import driver

    target = driver.active.get_current_target()
    return (target.backend, target.arch, target.warp_size)


class _CompileOnlyDriver:
    """Stands in for Triton's active driver: reports a fixed target and touches no device."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def use_compile_only_target(target: tuple[str, Any, int]) -> None:
    """Makes Triton's JIT in this process compile for `target` (``("cuda", 90, 32)``) without a device.

    A launch then binds, specialises and compiles (into the on-disk cache) as on that GPU; running fails.
    """
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    # a duck-typed stand-in, not a DriverBase subclass (which would need a device to initialise)
    driver.set_active(_CompileOnlyDriver(GPUTarget(*target)))  # type: ignore[arg-type]


def warm_up(kernel: Any, args: tuple, kwargs: dict) -> None:
    """Binds, specialises and compiles one launch of a ``JITFunction`` exactly as a real launch would, without
    running it (``kwargs`` holds the constexprs, the config's ``all_kwargs()`` and the options)."""
    kernel.run(*args, grid=None, warmup=True, **kwargs)


def compile_for(kernel: Any, args: tuple, kwargs: dict, arch: int = 90) -> Any:
    """Compiles one launch of a ``JITFunction`` for ``sm_<arch>`` with the JIT's own specialisation, in-process and
    without the cache lookup or a driver (what ``kernel[grid](*args, **kwargs)`` would build on that GPU).

    Returns:
        Triton's ``CompiledKernel`` (``.asm["cubin"]``, ``.metadata``).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


# ``Autotuner.cache`` (per-key best config) and ``Autotuner.configs_timings`` (the last benchmark's times, a list of
# quantiles or a float per config) are attributes of Triton 3.6 to 3.9 without a public accessor (the GPU kit's
# autotune step reads them).
@contextlib.contextmanager
def autotuner_timings(sink: list[dict[str, Any]]) -> Iterator[None]:
    """Inside the block every autotuned launch is benchmarked afresh (its key's cached choice dropped) and the
    autotuner's own time per config is appended to `sink` as ``{"kernel", "config", "ms"}``."""
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.cache.clear()
        before = getattr(self, "configs_timings", None)
        result = original(self, *args, **kwargs)
        timings = getattr(self, "configs_timings", None)
        if timings is not None and timings is not before:
            for config, value in timings.items():
                ms = value[0] if isinstance(value, (list, tuple)) else value
                sink.append({"kernel": python_function(self).__name__.lstrip("_").removesuffix("_kernel"),
                             "config": config, "ms": float(ms)})
        return result

    # Replacing a method of a library class for the block (mypy forbids assigning to methods).
    Autotuner.run = run  # type: ignore[method-assign]
    try:
        yield
    finally:
        # Restoring it.
        Autotuner.run = original  # type: ignore[method-assign]
