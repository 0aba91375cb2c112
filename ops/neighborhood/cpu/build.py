"""Builds the CPU kernels (``na_cpu.cpp``) with the system C++ compiler at first use and loads them with ctypes.

* Compiler: ``$CXX``, else the first of ``g++``, ``c++``, ``clang++`` on ``PATH``; flags ``-O3 -march=native`` (the
  instruction set of the machine that compiles, e.g. AVX-512; ``$NATZOO_CPU_ARCH`` names another, see :func:`flags`)
  ``-fopenmp-simd`` (vector loops without an OpenMP runtime) ``-shared -fPIC -pthread``.
* Cache: ``$NATZOO_CACHE_DIR``, else ``$XDG_CACHE_HOME/natzoo``, else ``~/.cache/natzoo``; the library is
  ``cpu-kernels/na_cpu-<key>.so`` with the key a hash of the source, the compiler's path and ``--version``, the flags
  and the CPU's feature flags, so a changed source, compiler or CPU builds anew. It is compiled to a temporary file
  in that folder and renamed into place (atomic): processes compiling at once each write their own temporary file
  and the last rename wins with an identical library.
* Failure (no compiler, a compile error, an unwritable cache, a library that does not load): one RuntimeWarning with
  the reason, and :func:`unavailable_reason` returns it, so dispatch uses the reference instead; never an error.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("na_cpu.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-pthread")


def torch_uses_libgomp() -> bool:
    """Whether this process has GNU OpenMP's runtime loaded (torch's wheels bring theirs as ``libgomp.so.1``)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return any(os.path.basename(line.split()[-1]).startswith("libgomp") for line in f if "/" in line)
    except OSError:
        return False


def flags() -> tuple[str, ...]:
    """:data:`FLAGS`, with ``-march=$NATZOO_CPU_ARCH`` when that is set (e.g. ``x86-64-v3`` for an AVX2 build that
    runs on other machines of a cluster, or to test the AVX2 code on an AVX-512 machine), and ``-fopenmp`` when torch
    runs on GNU OpenMP: the library then needs ``libgomp.so.1``, which resolves to the runtime torch already loaded,
    so the kernels' threads are torch's own OpenMP threads (elsewhere, e.g. Intel OpenMP, they are std::threads)."""
    arch = os.environ.get("NATZOO_CPU_ARCH")
    base = tuple(f"-march={arch}" if arch and f == "-march=native" else f for f in FLAGS)
    return base + (("-fopenmp",) if torch_uses_libgomp() else ())


COMPILE_TIMEOUT_S = 300


def cache_dir() -> Path:
    """Folder of the compiled libraries (see the module docstring)."""
    root = os.environ.get("NATZOO_CACHE_DIR")
    if root:
        return Path(root) / "cpu-kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "natzoo" / "cpu-kernels"


def find_compiler() -> str | None:
    """``$CXX`` (which may name a missing program: the build then fails with that reason), else one on PATH."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def build(source: str, compiler: str | None, folder: Path) -> Path:
    """Compiles `source` (C++ text) into ``folder/na_cpu-<key>.so`` unless that file exists; returns its path.

    Raises:
        RuntimeError: No compiler, or the compiler failed (its message included).
    """
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"the C++ compiler {compiler!r} cannot run ({type(exc).__name__}: {exc})") from None
    options = flags()  # read once: the cache key names the flags the library is compiled with
    key = hashlib.sha256("\0".join([source, compiler, version, *options, _cpu_flags()]).encode()).hexdigest()[:20]
    target = folder / f"na_cpu-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_src = tempfile.mkstemp(prefix=".na_cpu-", suffix=".cpp", dir=folder)
    tmp_lib = tmp_src[:-4] + ".so"
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(source)
        try:
            done = subprocess.run([compiler, *options, "-o", tmp_lib, tmp_src], capture_output=True, text=True,
                                  timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"the C++ compiler {compiler!r} cannot run ({type(exc).__name__}: {exc})") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            arch = os.environ.get("NATZOO_CPU_ARCH")
            named = f" with NATZOO_CPU_ARCH={arch!r} (-march={arch})" if arch else ""
            raise RuntimeError(f"{compiler} failed{named} (exit {done.returncode}): " + " | ".join(tail))
        os.replace(tmp_lib, target)
    finally:
        for path in (tmp_src, tmp_lib):
            if os.path.exists(path):
                os.remove(path)  # our own temporary files (mkstemp names), never another file
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i64p = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
    geometry = [i64, i64, i64, ctypes.c_int, i64p, i64p, i64p, i64p, i64p, i64p, ctypes.c_double, ctypes.c_int]
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"natzoo_na_forward_{suffix}")
        fwd.argtypes, fwd.restype = [p] * 6 + geometry, None
        bwd = getattr(lib, f"natzoo_na_backward_{suffix}")
        bwd.argtypes, bwd.restype = [p] * 11 + geometry, None
    return lib


@functools.lru_cache(maxsize=1)
def load() -> tuple[ctypes.CDLL | None, str | None]:
    """The loaded library and None, or None and why it is unavailable (warned once, on the first call)."""
    try:
        source = SOURCE.read_text(encoding="utf-8")
        path = build(source, find_compiler(), cache_dir())
        return _declare(ctypes.CDLL(str(path))), None
    except (OSError, RuntimeError, AttributeError) as exc:
        reason = f"the CPU kernels could not be built or loaded ({exc})"
        warnings.warn(f"natzoo neighborhood attention: {reason}; CPU tensors use backend='reference' instead",
                      RuntimeWarning, stacklevel=2)
        return None, reason


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    """None when the compiled CPU kernels are loaded (building them on the first call), else why not.

    Under ``torch.compile`` the call runs once while tracing and its result is a constant of the graph.
    """
    return load()[1]
