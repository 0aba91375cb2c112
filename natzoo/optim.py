"""Optimizer parameter groups and per-iteration learning-rate schedules (timm semantics)."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

__all__ = ["param_groups_weight_decay", "build_optimizer", "lr_at_step", "build_lr_lambda", "scaled_lr", "SCHEDULES"]

SCHEDULES = ("cosine", "constant")


def param_groups_weight_decay(
    model: nn.Module,
    weight_decay: float,
    no_decay_1d: bool = True,
    no_decay_rpb: bool = True,
    no_decay_names: Sequence[str] = (),
) -> list[dict]:
    """Splits trainable parameters into a decayed and an undecayed group.

    Exempt from decay: every 1-D parameter and every ``*.bias`` (norm weights, biases, layer-scale ``gamma``s) when
    ``no_decay_1d``; every parameter whose last name component is ``rpb`` when ``no_decay_rpb``; and every parameter
    whose name contains one of ``no_decay_names``. The model's own ``no_weight_decay()`` is deliberately not consulted,
    so that the config alone decides (the official NAT run decayed ``rpb``; spec section 5.3).

    Args:
        model: the network.
        weight_decay: decay of the decayed group.
        no_decay_1d: exempt 1-D parameters and biases (timm 0.5.0 behaviour, used by the official run).
        no_decay_rpb: exempt relative-position-bias tables named ``rpb``.
        no_decay_names: extra substrings of parameter names to exempt (e.g. ``pos_embed``).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = (
            (no_decay_1d and (param.ndim <= 1 or name.endswith(".bias")))
            or (no_decay_rpb and name.split(".")[-1] == "rpb")
            or any(key in name for key in no_decay_names)
        )
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def scaled_lr(lr: float, global_batch: int, base_batch: int, scale: bool) -> float:
    """``lr * global_batch / base_batch`` when ``scale``, else ``lr`` (the official recipe does not scale)."""
    return float(lr) * global_batch / base_batch if scale else float(lr)


def build_optimizer(name: str, groups: Iterable[dict], lr: float, betas: Sequence[float], eps: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (the recipe's optimizer) or SGD (for quick experiments)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {name!r}")


def lr_at_step(step: int, name: str, base_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int,
               total_steps: int) -> float:
    """Learning rate used by optimizer step ``step`` (0-based), as timm's per-iteration schedulers compute it.

    ``warmup_prefix=False``: the linear warmup from ``warmup_lr`` replaces the first ``warmup_steps`` of the schedule,
    which is measured from step 0. The cosine reaches ``min_lr`` at ``total_steps`` (the decay epochs, without
    cooldown) and stays there for any later step (the cooldown epochs).

    Args:
        step: optimizer step.
        name: ``"cosine"`` or ``"constant"``.
        base_lr: peak learning rate.
        warmup_lr: learning rate at step 0 when ``warmup_steps > 0``.
        min_lr: cosine floor.
        warmup_steps: linear-warmup length.
        total_steps: cosine length (``t_initial``).
    """
    if step < warmup_steps:
        return warmup_lr + step * (base_lr - warmup_lr) / warmup_steps
    if name == "constant":
        return base_lr
    if name == "cosine":
        if step >= total_steps:
            return min_lr
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * step / total_steps))
    raise ValueError(f"sched.name must be one of {SCHEDULES}, got {name!r}")


def build_lr_lambda(name: str, base_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int,
                    total_steps: int):
    """Multiplicative factor for ``torch.optim.lr_scheduler.LambdaLR`` (stepped once per optimizer step)."""
    if name not in SCHEDULES:
        raise ValueError(f"sched.name must be one of {SCHEDULES}, got {name!r}")
    total_steps = max(1, int(total_steps))

    def factor(step: int) -> float:
        return lr_at_step(step, name, base_lr, warmup_lr, min_lr, int(warmup_steps), total_steps) / base_lr

    return factor
