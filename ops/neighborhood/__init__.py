"""Neighborhood attention: validation, window arithmetic, the PyTorch reference, dispatch, modules and kernels."""

from .dispatch import use_backend

__all__ = ["use_backend"]
