"""Neighborhood attention: functional ops, modules, and their backends.

``ops.na1d/na2d/na3d`` take heads-last ``[B, *spatial, heads, head_dim]`` tensors (NATTEN's layout and argument
names); ``ops.NeighborhoodAttention1D/2D/3D`` are the channels-last modules used by the NAT/DiNAT models. The
process-wide backend switch is :func:`ops.neighborhood.dispatch.use_backend` (or ``$NATZOO_NA_BACKEND``).
"""

if __name__ != "natzoo.ops":
    # The folder is the subpackage natzoo.ops; imported under a second name it would register everything twice.
    raise ImportError(
        f"this is the package `natzoo.ops`; import it as `natzoo.ops` (it was imported as {__name__!r}, probably "
        "because the repository root is on sys.path)"
    )

from .neighborhood.functional import na1d, na2d, na3d
from .neighborhood.modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from .neighborhood.unfused import na1d_av, na1d_qk, na2d_av, na2d_qk, na3d_av, na3d_qk

__all__ = [
    "na1d",
    "na2d",
    "na3d",
    "na1d_qk",
    "na2d_qk",
    "na3d_qk",
    "na1d_av",
    "na2d_av",
    "na3d_av",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
]
