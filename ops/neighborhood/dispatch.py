"""Backend selection for the neighborhood-attention ops.

Precedence: an explicit ``backend='triton'|'dense'|'reference'`` argument, then the process-wide switch
(:func:`use_backend` context manager, per thread, else the ``NATZOO_NA_BACKEND`` environment variable), then
automatic selection: Triton for CUDA tensors it supports on a GPU it supports, ``dense`` (with one warning) on a GPU
below ``TRITON_MIN_CAPABILITY``, otherwise the reference path. Attention dropout always runs in the reference path.
Every choice is logged at debug level on the ``natzoo.ops.neighborhood`` logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator

import torch

from .dense import dense_unsupported_reason
from .validation import BACKENDS, Problem

logger = logging.getLogger("natzoo.ops.neighborhood")

ENV_VAR = "NATZOO_NA_BACKEND"
# Multiples of 16 up to 256; non-powers of two are padded inside the kernels by masked loads.
TRITON_HEAD_DIMS = tuple(range(16, 257, 16))
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Compute capability auto dispatch requires for the kernels: bfloat16 and TF32 tensor-core products start at sm_80,
# and the configs were sized for sm_80/sm_90. (Triton also compiles them for sm_75, ahead of time, but nothing below
# sm_80 was ever run or tuned.)
TRITON_MIN_CAPABILITY = (8, 0)
MAX_GRID_HEADS = 65535  # heads are grid axis 1; batch is folded into axis 0 (2**31 - 1), so it has no such limit
_ALLOWED = ", ".join(repr(b) for b in BACKENDS)

# The innermost use_backend() of the current thread (or asyncio task): a ContextVar, so a switch made in one thread
# never changes what another thread runs.
_forced: contextvars.ContextVar[tuple[str | None, ...]] = contextvars.ContextVar("natzoo_na_backend", default=())


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Forces a backend for every op call made by this thread inside the block (``None``/``'auto'``: automatic).

    Example:
        >>> with use_backend("reference"):
        ...     out = ops.na2d(q, k, v, kernel_size=7)
    """
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {_ALLOWED}, got {name!r}")
    token = _forced.set(_forced.get() + (name,))
    try:
        yield
    finally:
        _forced.reset(token)


def _requested(backend: str | None) -> tuple[str | None, str]:
    """The backend asked for and who asked: the argument, then use_backend(), then the environment variable."""
    if backend not in (None, "auto"):
        return backend, f"backend={backend!r}"
    stack = _forced.get()
    if stack:
        return stack[-1], f"use_backend({stack[-1]!r})"
    env = os.environ.get(ENV_VAR, "").strip().lower() or None
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of auto, triton, dense, reference (or unset), got {env!r}")
    return env, f"{ENV_VAR}={env} (environment variable)"


def forced_backend() -> str | None:
    """The process-wide backend switch: this thread's innermost :func:`use_backend`, else ``$NATZOO_NA_BACKEND``."""
    return _requested(None)[0]


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``), which lets kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once at import: torch.compile of torch 2.11 cannot trace `find_spec` inside a compiled region.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    """Whether the ``triton`` package is installed."""
    return _TRITON_FOUND


def _debug(msg: str, *args) -> None:
    """Debug log outside compiled regions only (a logger call inside ``torch.compile`` would break the graph)."""
    if not torch.compiler.is_compiling():
        logger.debug(msg, *args)


def triton_unsupported_reason(problem: Problem) -> str | None:
    """The Triton backend's capability predicate: None when it accepts the problem, else the reason."""
    if problem.device.type != "cuda" and not (problem.device.type == "cpu" and interpreter_enabled()):
        return f"device={problem.device} is not a CUDA device"
    if problem.dtype not in TRITON_DTYPES:
        return f"dtype={problem.dtype} not in supported set {{float16, bfloat16, float32}}"
    if problem.head_dim not in TRITON_HEAD_DIMS:
        return f"head_dim={problem.head_dim} not in supported set {{16, 32, 48, ..., 256}} (multiples of 16)"
    if problem.heads > MAX_GRID_HEADS:
        return f"heads={problem.heads} exceeds {MAX_GRID_HEADS} (grid axis 1 of the kernels)"
    return None


def triton_available(problem: Problem) -> bool:
    if not triton_importable():
        return False
    return problem.device.type == "cuda" and torch.cuda.is_available() or interpreter_enabled()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(index)
    return major, minor


def capability_reason(device: torch.device) -> str | None:
    """None when the GPU of `device` meets ``TRITON_MIN_CAPABILITY`` (or `device` is not a GPU), else why not."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = _capability(index)
    if (major, minor) < TRITON_MIN_CAPABILITY:
        need = ".".join(map(str, TRITON_MIN_CAPABILITY))
        return f"the Triton kernels need compute capability >= {need}, cuda:{index} has {major}.{minor}"
    return None


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"natzoo neighborhood attention: {reason}; using backend='dense' instead (backend='reference' where "
                  "the dense bias would be too large). Pass backend= ('dense' or 'reference'), use_backend() or "
                  "NATZOO_NA_BACKEND to choose explicitly.", RuntimeWarning, stacklevel=4)


def select_backend(
    problem: Problem, backend: str | None, has_rpb: bool = False, need_lse: bool = False, dropout_p: float = 0.0
) -> str:
    """Resolves the backend for one call: ``'triton'``, ``'dense'`` or ``'reference'``.

    A forced choice that cannot run the problem is an error naming who forced it (the argument, :func:`use_backend`
    or the environment variable); attention dropout (`dropout_p` > 0, the modules in training) needs the reference.
    """
    requested, source = _requested(backend)
    if requested == "reference":
        _debug("%s: reference backend (%s)", problem.name, source)
        return "reference"
    if dropout_p > 0.0:
        if requested in ("triton", "dense"):
            raise ValueError(f"{problem.name}: {source} asks for the {requested} backend, which has no attention "
                             f"dropout (dropout_p={dropout_p}); attention dropout runs in backend='reference' "
                             "(or set attn_drop=0 / call eval())")
        _debug("%s: reference backend (dropout_p=%s)", problem.name, dropout_p)
        return "reference"
    if requested == "dense":
        reason = dense_unsupported_reason(problem, has_rpb, need_lse)
        if reason is not None:
            raise ValueError(f"{problem.name}: {source} asks for the dense backend, which cannot run this problem: "
                             f"{reason}; use backend='triton' or backend='reference'")
        _debug("%s: dense backend (%s)", problem.name, source)
        return "dense"
    reason = triton_unsupported_reason(problem)
    if requested == "triton":
        if reason is not None:
            raise ValueError(f"{problem.name}: {source} asks for the Triton backend, which cannot run this problem: "
                             f"{reason}")
        if not triton_available(problem):
            raise RuntimeError(f"{problem.name}: {source} asks for the Triton backend, which needs Triton and a CUDA "
                               "device")
        gpu_reason = capability_reason(problem.device)
        if gpu_reason is not None:
            raise RuntimeError(f"{problem.name}: {source} asks for the Triton backend, but {gpu_reason}; use "
                               "backend='dense' or backend='reference'")
        _debug("%s: triton backend (%s)", problem.name, source)
        return "triton"
    if reason is None and triton_available(problem) and problem.device.type == "cuda":
        gpu_reason = capability_reason(problem.device)
        if gpu_reason is None:
            _debug("%s: triton backend (auto)", problem.name)
            return "triton"
        fallback = "dense" if dense_unsupported_reason(problem, has_rpb, need_lse) is None else "reference"
        if not torch.compiler.is_compiling():
            _warn_once(gpu_reason)
        _debug("%s: %s backend (auto: %s)", problem.name, fallback, gpu_reason)
        return fallback
    _debug("%s: reference backend (auto: %s)", problem.name, reason or "Triton unavailable")
    return "reference"
