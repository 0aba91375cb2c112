"""Backend selection for the neighborhood-attention ops: the backends as one table.

Each backend is an object with :meth:`Backend.refusal` (None when it can run a problem, else why not) and
:meth:`Backend.run`. :func:`select_backend` walks :data:`TABLE` in order (triton, cpu, dense, reference):

* Precedence of the request: an explicit ``backend=`` argument, then the process-wide switch (:func:`use_backend`
  context manager, per thread, else the ``NATZOO_NA_BACKEND`` environment variable), then automatic selection.
* A forced backend is checked against its refusal and refused with it (an error naming who forced it).
* Auto takes the first backend with no refusal and no auto-only objection: Triton for CUDA tensors it supports on a
  GPU it supports, the compiled CPU kernels for CPU tensors, ``dense`` (with one warning) on a GPU below
  ``TRITON_MIN_CAPABILITY``, otherwise the reference, which runs everything (attention dropout included).

Every choice is logged at debug level on the ``natzoo.ops.neighborhood`` logger, each distinct rejection once.
An empty batch is no special case here: :meth:`Backend.run` of every backend returns empty outputs attached to
the autograd graph without launching anything.
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
from dataclasses import dataclass

import torch

from .dense import dense_unsupported_reason, na_dense
from .reference import accumulation_dtype, na_reference
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
        raise ValueError(f"{ENV_VAR} must be one of auto, triton, cpu, dense, reference (or unset), got {env!r}")
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
                  "NATZOO_NA_BACKEND to choose explicitly.", RuntimeWarning, stacklevel=5)


@functools.lru_cache(maxsize=1024)
def _log_rejection(name: str, backend: str, reason: str) -> None:
    """Debug line for a backend auto selection passed over; cached, so each distinct rejection is logged once."""
    logger.debug("%s: auto skips the %s backend: %s", name, backend, reason)


@dataclass(frozen=True)
class Request:
    """What a call asks of a backend beyond the :class:`Problem`."""

    has_rpb: bool = False
    need_lse: bool = False
    dropout_p: float = 0.0


@dataclass(frozen=True)
class Refusal:
    """Why a backend cannot run a problem.

    ``clause`` continues "<source> asks for the <title> backend", e.g. ``", which cannot run this problem: ..."``;
    ``reason`` is the short form auto selection logs; ``error`` the exception type a forced choice raises;
    ``warn`` asks auto selection to warn once when it passes this backend over (a GPU Triton does not support).
    """

    reason: str
    clause: str
    error: type[Exception] = ValueError
    warn: bool = False


def _cannot(reason: str, advice: str = "") -> Refusal:
    return Refusal(reason, f", which cannot run this problem: {reason}{advice}")


def _no_dropout(title: str, request: Request) -> Refusal | None:
    if request.dropout_p <= 0.0:
        return None
    return Refusal(
        f"no attention dropout (dropout_p={request.dropout_p})",
        f", which has no attention dropout (dropout_p={request.dropout_p}); attention dropout runs in "
        "backend='reference' (or set attn_drop=0 / call eval())",
    )


def empty_batch(problem: Problem, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                rpb: torch.Tensor | None, need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The outputs of a batch of 0: empty tensors attached to the autograd graph of every input, so a backward pass
    gives gradients of the right shapes (zeros for `rpb`), without launching any kernel."""
    link = key.sum() + value.sum() + (rpb.sum() if rpb is not None else 0.0)  # 0-dim, 0 for the empty key/value
    out = (query * 0 + link.to(query.dtype) * 0).contiguous()  # [0, *S, H, D]
    lse = out.sum(-1).to(accumulation_dtype(query.dtype)) if need_lse else None
    return out, lse


class Backend:
    """One row of the table: what the backend is called, when it cannot run a problem, and how it runs one."""

    name = ""
    title = ""  # how error messages name it

    def refusal(self, problem: Problem, request: Request) -> Refusal | None:
        """None when the backend can run `problem` as requested (an empty batch included), else why not."""
        raise NotImplementedError

    def auto_objection(self, problem: Problem, request: Request) -> str | None:
        """Why auto selection passes over a backend that could run the problem (None: auto may take it)."""
        return None

    def run(self, problem: Problem, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            rpb: torch.Tensor | None, request: Request) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``out [B, *S, H, D]`` in `query`'s dtype and ``lse [B, *S, H]`` (or None unless ``request.need_lse``)."""
        if problem.batch == 0:
            return empty_batch(problem, query, key, value, rpb, request.need_lse)
        return self._run(problem, query, key, value, rpb, request)

    def _run(self, problem: Problem, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             rpb: torch.Tensor | None, request: Request) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class TritonBackend(Backend):
    """The fused Triton kernels (CUDA GPUs of compute capability >= ``TRITON_MIN_CAPABILITY``)."""

    name, title = "triton", "Triton"

    def refusal(self, problem: Problem, request: Request) -> Refusal | None:
        dropout = _no_dropout("triton", request)
        if dropout is not None:
            return dropout
        reason = triton_unsupported_reason(problem)
        if reason is not None:
            return _cannot(reason)
        if not triton_available(problem):
            return Refusal("Triton or a CUDA device unavailable", ", which needs Triton and a CUDA device",
                           RuntimeError)
        gpu_reason = capability_reason(problem.device)
        if gpu_reason is not None:
            return Refusal(gpu_reason, f", but {gpu_reason}; use backend='dense' or backend='reference'", RuntimeError,
                           warn=True)
        return None

    def auto_objection(self, problem: Problem, request: Request) -> str | None:
        if problem.device.type != "cuda":
            return "auto uses Triton only on CUDA tensors (TRITON_INTERPRET serves forced calls)"
        return None

    def _run(self, problem, query, key, value, rpb, request):
        from .triton import na_triton

        return na_triton(problem, query, key, value, rpb)


class CpuBackend(Backend):
    """The compiled C++ kernels of :mod:`.cpu` for CPU tensors (built at first use; see docs/ops.md)."""

    name, title = "cpu", "cpu"

    def refusal(self, problem: Problem, request: Request) -> Refusal | None:
        dropout = _no_dropout("cpu", request)
        if dropout is not None:
            return dropout
        if problem.device.type != "cpu":
            return _cannot(f"device={problem.device} is not the CPU")
        if torch.compiler.is_exporting():
            return _cannot("torch.export (and the ONNX exporter) trace the reference's decomposed operators")
        from . import cpu

        reason = cpu.unavailable_reason()
        if reason is not None:
            return Refusal(reason, f", which is unavailable: {reason}", RuntimeError)
        return None

    def _run(self, problem, query, key, value, rpb, request):
        from . import cpu

        return cpu.na_cpu(problem, query, key, value, rpb, request.need_lse)


class DenseBackend(Backend):
    """Dense attention with a neighbourhood bias (any device; auto only on GPUs below the Triton minimum)."""

    name, title = "dense", "dense"

    def refusal(self, problem: Problem, request: Request) -> Refusal | None:
        dropout = _no_dropout("dense", request)
        if dropout is not None:
            return dropout
        reason = dense_unsupported_reason(problem, request.has_rpb, request.need_lse)
        return None if reason is None else _cannot(reason, "; use backend='triton' or backend='reference'")

    def auto_objection(self, problem: Problem, request: Request) -> str | None:
        if problem.device.type == "cuda" and capability_reason(problem.device) is not None:
            return None
        return "auto uses dense only on a GPU the Triton kernels do not support"

    def _run(self, problem, query, key, value, rpb, request):
        return na_dense(problem, query, key, value, rpb, need_lse=request.need_lse)


class ReferenceBackend(Backend):
    """The pure-PyTorch reference: any device and dtype, attention dropout, second-order gradients.

    It owns the compile-time form: under ``torch.compile`` (not ``torch.export``) it runs as the opaque custom
    operator ``natzoo::na_reference`` of :mod:`.reference_op`; eagerly and under ``torch.export`` it runs the
    decomposed operators of :mod:`.reference` (which the ONNX exporter needs).
    """

    name, title = "reference", "reference"

    def refusal(self, problem: Problem, request: Request) -> Refusal | None:
        return None

    def _run(self, problem, query, key, value, rpb, request):
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            from .reference_op import na_reference_op

            return na_reference_op(problem, query, key, value, rpb, request.dropout_p, None, request.need_lse)
        return na_reference(problem, query, key, value, rpb, dropout_p=request.dropout_p, need_lse=request.need_lse)


TABLE: dict[str, Backend] = {b.name: b for b in (TritonBackend(), CpuBackend(), DenseBackend(), ReferenceBackend())}


def select_backend(
    problem: Problem, backend: str | None, has_rpb: bool = False, need_lse: bool = False, dropout_p: float = 0.0
) -> str:
    """Resolves the backend for one call: a key of :data:`TABLE` (``'triton'``, ``'cpu'``, ``'dense'``,
    ``'reference'``).

    A forced choice that cannot run the problem is an error naming who forced it (the argument, :func:`use_backend`
    or the environment variable) and the backend's reason; attention dropout (`dropout_p` > 0, the modules in
    training) runs only in the reference.
    """
    request = Request(has_rpb, need_lse, dropout_p)
    requested, source = _requested(backend)
    if requested is not None and requested != "auto":
        refusal = TABLE[requested].refusal(problem, request)
        if refusal is not None:
            raise refusal.error(f"{problem.name}: {source} asks for the {TABLE[requested].title} backend"
                                f"{refusal.clause}")
        _debug("%s: %s backend (%s)", problem.name, requested, source)
        return requested
    warn = None
    for entry in TABLE.values():
        refusal = entry.refusal(problem, request)
        reason = refusal.reason if refusal is not None else entry.auto_objection(problem, request)
        if reason is None:
            if warn is not None and not torch.compiler.is_compiling():
                _warn_once(warn)
            why = f"auto: {warn}" if warn is not None else f"dropout_p={dropout_p}" if dropout_p > 0.0 else "auto"
            _debug("%s: %s backend (%s)", problem.name, entry.name, why)
            return entry.name
        if refusal is not None and refusal.warn:
            warn = refusal.reason
        if not torch.compiler.is_compiling():
            _log_rejection(problem.name, entry.name, reason)
    raise AssertionError("the reference backend refuses nothing")  # pragma: no cover
