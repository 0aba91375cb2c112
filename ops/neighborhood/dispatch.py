"""Backend selection for the neighborhood-attention ops.

Precedence: an explicit ``backend='triton'|'reference'`` argument, then the process-wide switch
(:func:`use_backend` context manager, else the ``NATZOO_NA_BACKEND`` environment variable), then automatic
selection (Triton for CUDA tensors it supports, otherwise the reference path).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from typing import Iterator, Optional

import torch

from .validation import Problem

logger = logging.getLogger("natzoo.ops.neighborhood")

ENV_VAR = "NATZOO_NA_BACKEND"
# Multiples of 16 up to 256; non-powers of two are padded inside the kernels by masked loads.
TRITON_HEAD_DIMS = tuple(range(16, 257, 16))
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_forced: list = []


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Forces a backend for every op call inside the block (``None``/``'auto'`` restores automatic selection).

    Example:
        >>> with use_backend("reference"):
        ...     out = ops.na2d(q, k, v, kernel_size=7)
    """
    if name not in (None, "auto", "triton", "reference"):
        raise ValueError(f"use_backend: name must be one of None, 'auto', 'triton', 'reference', got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def forced_backend() -> Optional[str]:
    """The process-wide backend switch: the innermost :func:`use_backend`, else ``$NATZOO_NA_BACKEND``."""
    if _forced:
        return _forced[-1]
    env = os.environ.get(ENV_VAR, "").strip().lower() or None
    if env not in (None, "auto", "triton", "reference"):
        raise ValueError(f"{ENV_VAR} must be one of auto, triton, reference, got {env!r}")
    return env


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


def triton_unsupported_reason(problem: Problem) -> Optional[str]:
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


def select_backend(problem: Problem, backend: Optional[str]) -> str:
    """Resolves the backend for one call, raising V19 errors for an impossible forced choice."""
    requested = backend if backend not in (None, "auto") else forced_backend()
    if requested == "reference":
        _debug("%s: reference backend (requested)", problem.name)
        return "reference"
    reason = triton_unsupported_reason(problem)
    if requested == "triton":
        if reason is not None:
            raise ValueError(f"{problem.name}: backend='triton' cannot run this problem: {reason}")
        if not triton_available(problem):
            raise RuntimeError(f"{problem.name}: backend='triton' needs Triton and a CUDA device")
        _debug("%s: triton backend (requested)", problem.name)
        return "triton"
    if reason is None and triton_available(problem) and problem.device.type == "cuda":
        _debug("%s: triton backend (auto)", problem.name)
        return "triton"
    _debug("%s: reference backend (auto: %s)", problem.name, reason or "Triton unavailable")
    return "reference"
