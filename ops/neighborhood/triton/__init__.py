"""Fused Triton neighborhood-attention kernels (forward and backward, rpb included); see docs/kernels.md.

``na_triton`` is what ``ops.neighborhood.functional`` calls for the ``'triton'`` backend.
"""

from __future__ import annotations

import torch

from ..validation import Problem
from .op import na_bwd, na_fwd

__all__ = ["na_bwd", "na_fwd", "na_triton"]


def na_triton(
    problem: Problem,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the fused kernels through the ``natzoo::na_fwd`` custom op (differentiable in q, k, v and rpb).

    Returns:
        ``out`` ``[B, *S, H, D]`` in `query`'s dtype and ``lse`` ``[B, *S, H]`` float32 (natural log).
    """
    return torch.ops.natzoo.na_fwd(
        query,
        key,
        value,
        rpb,
        list(problem.kernel_size),
        list(problem.stride),
        list(problem.dilation),
        list(problem.is_causal),
        float(problem.scale),
    )
