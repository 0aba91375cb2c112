"""The CPU backend: compiled C++ kernels for the fused op (forward and backward), built at first use.

:mod:`.build` compiles and loads ``na_cpu.cpp``; :mod:`.op` wraps it as the custom operators ``natzoo::na_cpu`` and
``natzoo::na_cpu_backward`` (opaque under ``torch.compile``, with shape-only fake implementations).
"""

from .build import unavailable_reason
from .op import na_cpu

__all__ = ["na_cpu", "unavailable_reason"]
