"""Repeated augmentation (``data.aug_repeats``): timm's distributed-aware ``RepeatAugSampler`` under Lightning."""

from __future__ import annotations

from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DistributedSampler

__all__ = ["RepeatAugmentSampler", "one_process_aug_repeats"]


class RepeatAugmentSampler(RepeatAugSampler, DistributedSampler):
    """timm's ``RepeatAugSampler`` (DeiT's repeated augmentation): every selected image is drawn ``num_repeats``
    times per epoch, each copy on a different process, so each process augments it independently; an epoch keeps the
    length of one pass over the dataset (split across the processes).

    It is also a ``DistributedSampler`` by type, so that Lightning uses it as it is in distributed runs instead of
    wrapping it in a second distributed sampler (``Trainer(use_distributed_sampler=True)`` replaces only samplers of
    other types); its own ``__init__``, ``__iter__`` and ``set_epoch`` are timm's. The shuffle is seeded by the epoch
    number alone, so a resumed run draws the same order.
    """


def one_process_aug_repeats(repeats: int) -> str:
    """The refusal of ``data.aug_repeats`` in a run of one process."""
    return (f"data.aug_repeats={repeats} is repeated augmentation across processes (DeiT; timm's RepeatAugSampler "
            f"puts the {repeats} copies of an image on {repeats} different processes), but this run has one process: "
            f"timm's sampler would then show each epoch only about 1/{repeats} of the training images. Set "
            "data.aug_repeats=0, or train on several devices (trainer.devices=<n> with a distributed strategy)")
