"""``natten`` on natzoo: NATTEN's public names (0.14 to 0.17) for code written against NATTEN.

Import it as ``natzoo.compat.natten``, or call :func:`natzoo.compat.install_natten` to make ``import natten`` (and
``natten.functional``, ``natten.na2d``, ...) resolve here. Nothing registers on import.
"""

from __future__ import annotations

import torch

from . import functional
from .modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

# The newest NATTEN API this layer follows, marked as natzoo's (code that sniffs the version takes the 0.17 paths,
# e.g. the ``rel_pos_bias`` keyword).
__version__ = "0.17.4+natzoo"
__natzoo_compat__ = True

__all__ = [
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "functional",
    "has_bfloat",
    "has_cuda",
    "has_fna",
    "has_gemm",
    "has_half",
    "is_fna_enabled",
    "use_fused_na",
]


def has_cuda() -> bool:
    """Whether a CUDA device is visible (natzoo's op needs no compiled extension)."""
    return torch.cuda.is_available()


def has_half(device_index: int | None = None) -> bool:
    """float16 is supported on every device (the reference path on CPU, the kernels on CUDA)."""
    return True


def has_bfloat(device_index: int | None = None) -> bool:
    """bfloat16 is supported on every device."""
    return True


def has_gemm(device_index: int | None = None) -> bool:
    """NATTEN's GEMM kernels do not exist here; natzoo's fused kernels take their place."""
    return False


def has_fna(device_index: int | None = None) -> bool:
    """Fused attention is natzoo's default path (Triton on CUDA, the reference elsewhere)."""
    return True


def use_fused_na(mode: bool = True, kv_parallel: bool = True, use_flex_attention: bool = False) -> None:
    """Accepted for NATTEN 0.17 code; natzoo always runs its fused op through ``na*d`` and the unfused one through
    ``na*d_qk``/``na*d_av``, so there is nothing to switch."""


def is_fna_enabled() -> bool:
    """Always true: see :func:`use_fused_na`."""
    return True
