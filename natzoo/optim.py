"""Optimizers and per-iteration learning-rate schedules shared by every task.

One weight-decay rule for every model: timm's ``param_groups_weight_decay`` with the names the model itself lists in
``no_weight_decay(...)`` (the NAT families list biases, norms, layer-scale gammas and, when asked, ``rpb``), plus
timm's 1-D/bias rule and any configured name patterns, so models without the method work too. The optimizer comes
from timm's factory (``create_optimizer_v2``: any timm optimizer name). Schedules are ``LambdaLR`` factors stepped
once per optimizer step, so Lightning checkpoints and restores them like any PyTorch scheduler.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from natzoo.rules import Choice, Flag, Integer, ListOf, Number, Rule, Text, Texts, check_settings

__all__ = [
    "MILESTONE_UNITS",
    "OPTIM_RULES",
    "SCHEDULES",
    "SCHED_REQUIRED",
    "SCHED_RULES",
    "build_lr_lambda",
    "check_optim_settings",
    "configure_optimizers",
    "lr_at_step",
    "param_groups",
    "scaled_lr",
    "steps_per_epoch",
    "warmup_step_factor",
]

log = logging.getLogger(__name__)

# Keys every schedule needs, by name: the schedules of build_lr_lambda.
SCHED_REQUIRED: dict[str, tuple[str, ...]] = {
    "cosine": ("epochs", "warmup_epochs", "warmup_lr", "min_lr"),
    "constant": ("epochs", "warmup_epochs", "warmup_lr", "min_lr"),
    "warmup_step": ("epochs", "warmup_steps", "warmup_ratio", "milestones", "milestone_unit", "gamma"),
}
SCHEDULES = tuple(SCHED_REQUIRED)
MILESTONE_UNITS = ("epoch", "step")


def _is_timm_optimizer(name: str) -> bool:
    from timm.optim import list_optimizers

    return name.lower().split("_")[-1] in list_optimizers()


_POSITIVE = Number(0.0, low_open=True)
_NON_NEGATIVE = Number(0.0)

# Optimizer settings (configs/optim) read by configure_optimizers.
OPTIM_RULES: dict[str, Rule] = {
    "name": Text(valid=_is_timm_optimizer, what="an optimizer name of timm.optim.list_optimizers() (adamw, sgd, ...)"),
    "lr": _POSITIVE,
    "scale_lr": Flag(),
    "lr_base_batch": Integer(1),
    "weight_decay": _NON_NEGATIVE,
    "betas": ListOf(Number(0.0, 1.0, high_open=True), length=2),
    "eps": _POSITIVE,
    "momentum": Number(0.0, 1.0, high_open=True),
    "no_decay_1d": Flag(),
    "no_decay_rpb": Flag(),
    "no_decay_names": Texts(),
}

# Schedule settings (configs/sched) read by build_lr_lambda and the trainer's max_epochs.
SCHED_RULES: dict[str, Rule] = {
    "name": Choice(SCHEDULES),
    "epochs": Integer(1),
    "cooldown_epochs": Integer(0),
    "warmup_epochs": _NON_NEGATIVE,
    "warmup_lr": _NON_NEGATIVE,
    "min_lr": _NON_NEGATIVE,
    "warmup_steps": Integer(0),
    "warmup_ratio": Number(0.0, 1.0, low_open=True),
    "milestones": ListOf(Integer(0)),
    "milestone_unit": Choice(MILESTONE_UNITS),
    "gamma": _POSITIVE,
}


def check_optim_settings(optim: Mapping[str, Any] | None, sched: Mapping[str, Any] | None) -> None:
    """Checks a LightningModule's ``optim``/``sched`` arguments (``configs/optim``, ``configs/sched``) before anything
    is built: every optimizer key must be present, and the keys the schedule ``sched.name`` needs; None skips a check
    (a module built for evaluation only).

    Raises:
        ValueError: a required key is missing, or a value is out of range or not one of the choices.
        TypeError: a value has the wrong type.
    """
    if optim is not None:
        check_settings(optim, OPTIM_RULES, "optim", required=tuple(OPTIM_RULES))
    if sched is not None:
        check_settings(sched, SCHED_RULES, "sched", required=("name",))
        check_settings(sched, SCHED_RULES, "sched", required=SCHED_REQUIRED[sched["name"]])


def _own_no_weight_decay(model: nn.Module, no_decay_rpb: bool) -> set[str]:
    method = getattr(model, "no_weight_decay", None)
    if not callable(method):
        return set()
    if "include_rpb" in inspect.signature(method).parameters:
        return set(method(include_rpb=no_decay_rpb))
    return set(method())


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_1d: bool = True,
    no_decay_rpb: bool = True,
    no_decay_names: Sequence[str] = (),
    layer_decay: float | None = None,
) -> list[dict]:
    """Decayed and undecayed parameter groups of ``model`` (frozen parameters are left out).

    Exempt from decay: the names the model returns from ``no_weight_decay(include_rpb=no_decay_rpb)`` (or from
    ``no_weight_decay()`` for timm models without the ``include_rpb`` argument); with ``no_decay_1d``, every 1-D
    parameter and every ``*.bias``; every name matching one of ``no_decay_names`` (``fnmatch`` patterns such as
    ``*rpb*``).

    Args:
        model: the network (its own parameter names are matched).
        weight_decay: decay of the decayed group.
        no_decay_1d: timm's rule for 1-D parameters and biases.
        no_decay_rpb: passed to the model's ``no_weight_decay`` as ``include_rpb``; ``False`` decays the relative
            position bias tables, as the published NAT ImageNet run did.
        no_decay_names: extra name patterns to exempt.
        layer_decay: layer-wise lr decay (``optim.layer_decay``): timm's ``param_groups_layer_decay`` splits the
            groups by depth with the model's ``group_matcher`` (stem first, then every block, downsampler and final
            norm in order, the head last) and gives layer ``i`` of ``n`` the ``lr_scale`` ``layer_decay ** (n - 1 -
            i)``; None: one depth.
    """
    names = _own_no_weight_decay(model, bool(no_decay_rpb)) | set(no_decay_names)
    if layer_decay is not None:
        return param_groups_layer_decay(model, float(weight_decay), no_weight_decay_list=names,
                                        weight_decay_exclude_1d=bool(no_decay_1d), layer_decay=float(layer_decay))
    return param_groups_weight_decay(model, float(weight_decay), weight_decay_exclude_1d=bool(no_decay_1d),
                                     no_weight_decay_list=names)


def scaled_lr(lr: float, global_batch: int, base_batch: int, scale: bool) -> float:
    """``lr * global_batch / base_batch`` when ``scale``, else ``lr`` (the official recipe does not scale)."""
    return float(lr) * global_batch / base_batch if scale else float(lr)


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps per training epoch, from Lightning's ``estimated_stepping_batches`` (which sets up the
    training data when needed).

    Raises:
        ValueError: the epoch length is unknown (an iterable dataset or ``trainer.max_epochs=-1``); the schedules are
            defined in epochs.
    """
    trainer.estimated_stepping_batches  # noqa: B018  (sets up the training data loader if needed)
    batches = trainer.num_training_batches
    if math.isinf(batches) or trainer.max_epochs in (None, -1):
        raise ValueError("the learning-rate schedule is defined in epochs, so it needs a finite trainer.max_epochs and "
                         "a training set of known length")
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


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
    raise ValueError(f"sched.name must be 'cosine' or 'constant' here, got {name!r}")


def warmup_step_factor(
    step: int, steps_per_epoch: int, milestones: Sequence[int], milestone_unit: str, gamma: float,
    warmup_steps: int, warmup_ratio: float,
) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): mmcv's linear warmup times a step decay.

    Warmup (mmcv ``warmup='linear'``): ``1 - (1 - step / warmup_steps) * (1 - warmup_ratio)`` for
    ``step < warmup_steps``. Step decay: ``gamma ** n`` with ``n`` the number of milestones already reached, where a
    milestone in epochs is reached at the first step of that (0-based) epoch, as mmcv's epoch-based ``step`` policy.

    Args:
        step: optimizer step.
        steps_per_epoch: optimizer steps per epoch (used when ``milestone_unit == "epoch"``).
        milestones: epochs (or steps) at which the LR is multiplied by ``gamma``.
        milestone_unit: ``"epoch"`` or ``"step"``.
        gamma: decay per milestone.
        warmup_steps: warmup length in steps (0 disables warmup).
        warmup_ratio: factor at step 0.
    """
    position = step // max(1, steps_per_epoch) if milestone_unit == "epoch" else step
    factor = gamma ** sum(position >= m for m in milestones)
    if step < warmup_steps:
        factor *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return factor


def build_lr_lambda(sched: dict[str, Any], base_lr: float, epoch_steps: int) -> Callable[[int], float]:
    """Multiplicative factor for ``torch.optim.lr_scheduler.LambdaLR`` (stepped once per optimizer step).

    Args:
        sched: a ``configs/sched`` entry. ``cosine``/``constant``: ``epochs``, ``warmup_epochs``, ``warmup_lr``,
            ``min_lr``; ``warmup_step``: ``warmup_steps``, ``warmup_ratio``, ``milestones``, ``milestone_unit``,
            ``gamma``.
        base_lr: peak learning rate (the optimizer's lr).
        epoch_steps: optimizer steps per epoch.
    """
    name = sched["name"]
    if name == "warmup_step":
        args = (epoch_steps, tuple(sched["milestones"]), sched["milestone_unit"], float(sched["gamma"]),
                int(sched["warmup_steps"]), float(sched["warmup_ratio"]))
        return lambda step: warmup_step_factor(step, *args)
    if name not in SCHEDULES:
        raise ValueError(f"sched.name must be one of {SCHEDULES}, got {name!r}")
    warmup_steps = round(float(sched["warmup_epochs"]) * epoch_steps)
    total_steps = max(1, round(float(sched["epochs"]) * epoch_steps))
    warmup_lr, min_lr = float(sched["warmup_lr"]), float(sched["min_lr"])
    return lambda step: lr_at_step(step, name, base_lr, warmup_lr, min_lr, warmup_steps, total_steps) / base_lr


def configure_optimizers(module: pl.LightningModule, model: nn.Module, optim: dict[str, Any] | None,
                         sched: dict[str, Any] | None) -> dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns for ``model`` trained with the ``optim``/``sched``
    settings (``configs/optim``, ``configs/sched``): parameter groups by :func:`param_groups` (with
    ``optim.layer_decay``, each group's lr is ``lr * lr_scale`` and the schedule multiplies it), timm's optimizer
    ``optim.name``, the lr scaled with the global batch when ``optim.scale_lr``, and a per-step ``LambdaLR``.

    Raises:
        ValueError: the module was built without ``optim`` or ``sched`` settings.
    """
    if not optim or not sched:
        raise ValueError(f"{type(module).__name__} was built without optim/sched settings; pass the optim= and sched= "
                         "dictionaries of configs/optim and configs/sched to train it")
    trainer = module.trainer
    epoch_steps = steps_per_epoch(trainer)
    datamodule = getattr(trainer, "datamodule", None)
    global_batch = int(getattr(datamodule, "batch_size", None) or 1) * trainer.world_size \
        * trainer.accumulate_grad_batches
    lr = scaled_lr(optim["lr"], global_batch, int(optim["lr_base_batch"]), bool(optim["scale_lr"]))
    groups = param_groups(model, optim["weight_decay"], optim["no_decay_1d"], optim["no_decay_rpb"],
                          tuple(optim["no_decay_names"] or ()), optim.get("layer_decay"))
    for group in groups:
        if "lr_scale" in group:  # layer-wise decay: the schedule then scales each group's own peak lr
            group["lr"] = lr * float(group["lr_scale"])
    extra: dict[str, Any] = {k: (tuple(optim[k]) if k == "betas" else float(optim[k])) for k in ("betas", "eps") if k in optim}
    optimizer = create_optimizer_v2(groups, opt=optim["name"], lr=lr, momentum=float(optim["momentum"]), **extra)
    if getattr(trainer, "is_global_zero", True):  # one line per run, not one per DDP process
        log.info("optimizer %s: lr %.3g (global batch %d%s), schedule %s over %d steps (%d per epoch)", optim["name"],
                 lr, global_batch, ", scaled" if optim["scale_lr"] else "", sched["name"],
                 int(trainer.estimated_stepping_batches), epoch_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(sched, lr, epoch_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
