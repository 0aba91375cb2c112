"""Backend selection for the neighborhood-attention ops.

Precedence: an explicit ``backend='triton'|'reference'`` argument, then the process-wide switch
(:func:`use_backend` context manager, per thread, else the ``NATZOO_NA_BACKEND`` environment variable), then
automatic selection (Triton for CUDA tensors it supports, otherwise the reference path).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
from typing import Iterator

import torch

from .validation import BACKENDS, Problem

logger = logging.getLogger("natzoo.ops.neighborhood")

ENV_VAR = "NATZOO_NA_BACKEND"
# Multiples of 16 up to 256; non-powers of two are padded inside the kernels by masked loads.
TRITON_HEAD_DIMS = tuple(range(16, 257, 16))
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

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
        raise ValueError(f"use_backend: name must be one of None, 'auto', 'triton', 'reference', got {name!r}")
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
        raise ValueError(f"{ENV_VAR} must be one of auto, triton, reference (or unset), got {env!r}")
    return env, f"{ENV_VAR}={env} (environment variable)"


def forced_backend() -> str | None:
    """The process-wide backend switch: this thread's innermost :func:`use_backend`, else ``$NATZOO_NA_BACKEND``."""
    return _requested(None)[0]


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``), which lets kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


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
    return None


def triton_available(problem: Problem) -> bool:
    if not triton_importable():
        return False
    return problem.device.type == "cuda" and torch.cuda.is_available() or interpreter_enabled()


def select_backend(problem: Problem, backend: str | None) -> str:
    """Resolves the backend for one call; a forced choice the Triton backend cannot run is an error naming who
    forced it (the argument, :func:`use_backend` or the environment variable)."""
    requested, source = _requested(backend)
    if requested == "reference":
        _debug("%s: reference backend (%s)", problem.name, source)
        return "reference"
    reason = triton_unsupported_reason(problem)
    if requested == "triton":
        if reason is not None:
            raise ValueError(f"{problem.name}: {source} asks for the Triton backend, which cannot run this problem: "
                             f"{reason}")
        if not triton_available(problem):
            raise RuntimeError(f"{problem.name}: {source} asks for the Triton backend, which needs Triton and a CUDA "
                               "device")
        _debug("%s: triton backend (%s)", problem.name, source)
        return "triton"
    if reason is None and triton_available(problem) and problem.device.type == "cuda":
        _debug("%s: triton backend (auto)", problem.name)
        return "triton"
    _debug("%s: reference backend (auto: %s)", problem.name, reason or "Triton unavailable")
    return "reference"
