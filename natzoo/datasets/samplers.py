"""Repeated augmentation (``data.aug_repeats``): timm's distributed-aware ``RepeatAugSampler`` under Lightning."""

from __future__ import annotations

from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DistributedSampler

__all__ = ["RepeatAugmentSampler"]


class RepeatAugmentSampler(RepeatAugSampler, DistributedSampler):
    """timm's ``RepeatAugSampler`` (DeiT's repeated augmentation): every selected image is drawn ``num_repeats``
    times per epoch, each copy on a different process, so each process augments it independently; an epoch keeps the
    length of one pass over the dataset (split across the processes).

    It is also a ``DistributedSampler`` by type, so that Lightning uses it as it is in distributed runs instead of
    wrapping it in a second distributed sampler (``Trainer(use_distributed_sampler=True)`` replaces only samplers of
    other types); its own ``__init__``, ``__iter__`` and ``set_epoch`` are timm's. The shuffle is seeded by the epoch
    number alone, so a resumed run draws the same order.
    """
