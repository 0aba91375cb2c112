"""Compatibility layers for code written against other neighborhood-attention libraries.

:func:`install_natten` registers :mod:`natzoo.compat.natten` under the name ``natten`` (NATTEN's public API on
natzoo's op), so unmodified NATTEN-based code such as the official NAT/DiNAT models runs on natzoo. It is never done
on import; :func:`uninstall_natten` undoes it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.metadata
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["install_natten", "uninstall_natten"]

# Module names NATTEN code imports, and the compat module each resolves to.
_NAMES = {
    "natten": "natzoo.compat.natten",
    "natten.context": "natzoo.compat.natten.context",
    "natten.functional": "natzoo.compat.natten.functional",
    "natten.modules": "natzoo.compat.natten.modules",
    "natten.natten1d": "natzoo.compat.natten.modules",
    "natten.natten2d": "natzoo.compat.natten.modules",
    "natten.natten3d": "natzoo.compat.natten.modules",
    "natten.na1d": "natzoo.compat.natten.modules",
    "natten.na2d": "natzoo.compat.natten.modules",
    "natten.na3d": "natzoo.compat.natten.modules",
    # NATTEN 0.14.0-0.14.4's module names.
    "natten.nattencuda": "natzoo.compat.natten.modules",
    "natten.nattencuda1d": "natzoo.compat.natten.modules",
    "natten.nattencuda2d": "natzoo.compat.natten.modules",
}


class _CompatDistribution(importlib.metadata.Distribution):
    """In-process package metadata for ``natten`` while installed: libraries that check for NATTEN with
    ``importlib.metadata.version("natten")`` (transformers does) then find the compat layer."""

    def read_text(self, filename: str) -> str | None:
        if filename != "METADATA":
            return None
        from .natten import __version__

        return (f"Metadata-Version: 2.1\nName: natten\nVersion: {__version__}\n"
                "Summary: natzoo's NATTEN compatibility layer (natzoo.compat.natten), registered by install_natten()\n")

    def locate_file(self, path: Any) -> Path:
        return Path(__file__).parent / "natten" / str(path)


class _CompatMetadataFinder(importlib.abc.MetaPathFinder):
    """Answers metadata look-ups for ``natten`` only; imports are untouched (``find_spec`` returns None)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        return None

    def find_distributions(self, context: Any = None) -> Iterator[importlib.metadata.Distribution]:
        name = getattr(context, "name", None)
        if name is None or name.lower().replace("-", "_") == "natten":
            yield _CompatDistribution()


_finder = _CompatMetadataFinder()


def _ours(module: ModuleType | None) -> bool:
    return module is not None and (module.__name__ or "").startswith("natzoo.compat.natten")


def install_natten() -> ModuleType:
    """Makes ``import natten`` (and its submodules listed in ``_NAMES``) resolve to :mod:`natzoo.compat.natten`.

    Idempotent. Nothing is installed on disk: the names go into ``sys.modules`` of this process, and a metadata
    finder answers ``importlib.metadata.version("natten")`` with ``natzoo.compat.natten.__version__`` (libraries
    such as transformers test for NATTEN that way, once, when they are imported: call this first).

    Returns:
        The ``natten`` module now registered.

    Raises:
        RuntimeError: A real NATTEN (any ``natten`` or ``natten.*`` module not from natzoo) is already imported;
            natzoo never replaces it under code that already holds references to it.
    """
    foreign = sorted(name for name, mod in sys.modules.items()
                     if (name == "natten" or name.startswith("natten.")) and not _ours(mod))
    if foreign:
        where = getattr(sys.modules.get(foreign[0]), "__file__", None)
        raise RuntimeError(
            f"install_natten: a real NATTEN is already imported ({foreign[0]!r} from {where}); natzoo does not "
            "replace it. Call install_natten() before anything imports natten, or use that NATTEN."
        )
    for name, target in _NAMES.items():
        sys.modules[name] = importlib.import_module(target)
    if _finder not in sys.meta_path:
        sys.meta_path.append(_finder)
    return sys.modules["natten"]


def uninstall_natten() -> None:
    """Removes the names :func:`install_natten` registered (only those still pointing at natzoo's modules) and its
    metadata finder."""
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    for name in _NAMES:
        if _ours(sys.modules.get(name)):
            del sys.modules[name]
