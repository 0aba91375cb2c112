"""Checkpoint averaging, as timm's ``avg_checkpoints.py``: keep the best k epochs' checkpoints and average their
weights into one checkpoint, which evaluates and fine-tunes like any other (``eval.py ckpt_path=...``).

During training, the ``average_checkpoints`` callback (``configs/callbacks/default.yaml``, ``top_k: 0`` = off) keeps
the best ``top_k`` checkpoints by the task's metric in ``checkpoints/top/`` and writes ``checkpoints/averaged.ckpt``
when training ends. After training, :func:`average_checkpoints` averages any list of Lightning checkpoints of the
same model (``python -m natzoo.tools.averaging OUT.ckpt IN1.ckpt IN2.ckpt ...``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from natzoo.checkpoints import atomic_torch_save, read_lightning_checkpoint

__all__ = ["AverageBestCheckpoints", "average_checkpoints", "average_state_dicts"]

_RUN_METRIC = "<the run's metric>"


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors (accumulated in float64, returned in each tensor's dtype);
    other tensors (integer counters) are taken from the first state.

    Raises:
        ValueError: no states, or the states' keys or shapes differ (the message names the first difference).
    """
    if not states:
        raise ValueError("no checkpoints to average")
    first = states[0]
    for index, state in enumerate(states[1:], start=1):
        if state.keys() != first.keys():
            diff = sorted(state.keys() ^ first.keys())
            raise ValueError(f"checkpoint {index} has other keys than checkpoint 0 (e.g. {diff[:3]}): not the same "
                             "model")
        for key, value in state.items():
            if value.shape != first[key].shape:
                raise ValueError(f"checkpoint {index}: {key} has shape {tuple(value.shape)}, checkpoint 0 "
                                 f"{tuple(first[key].shape)}: not the same model")
    averaged = {}
    for key, value in first.items():
        if value.is_floating_point():
            total = torch.stack([state[key].to(torch.float64) for state in states]).sum(0)
            averaged[key] = (total / len(states)).to(value.dtype)
        else:
            averaged[key] = value.clone()
    return averaged


def average_checkpoints(paths: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Averages the weights of Lightning checkpoints of one model into ``output`` (written atomically).

    The result is the first checkpoint with its ``state_dict`` replaced by the average, without optimizer and
    schedule state (it is for evaluation and fine-tuning, not for resuming); ``averaged_from`` lists the inputs.

    Raises:
        ValueError: fewer than one file, a file that is not a Lightning checkpoint (read weights-only), checkpoints of
            different models, or ``output`` among the inputs.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("average_checkpoints: no checkpoint files given")
    out = Path(output)
    if any(out.resolve() == f.resolve() for f in files):
        raise ValueError(f"average_checkpoints: output {out} is one of the inputs; write the average elsewhere")
    checkpoints = [read_lightning_checkpoint(f, key="checkpoint") for f in files]
    result: dict[str, Any] = {k: v for k, v in checkpoints[0].items()
                              if k not in ("optimizer_states", "lr_schedulers", "loops", "callbacks")}
    result["state_dict"] = average_state_dicts([c["state_dict"] for c in checkpoints])
    result["averaged_from"] = [str(f) for f in files]
    atomic_torch_save(result, out)
    return out


class AverageBestCheckpoints(ModelCheckpoint):
    """Keeps the ``top_k`` best checkpoints (weights only) by the run's monitored metric in ``dirpath`` and, when
    training ends, averages them into ``<dirpath>/../averaged.ckpt``; ``top_k: 0`` turns it off.

    The metric and its mode are those of the run's main checkpoint callback (the task's: ``val/acc1`` for
    classification) unless ``monitor`` is given.

    Args:
        dirpath: where the best checkpoints are kept.
        top_k: how many to keep and average.
        monitor: metric to rank by (None: the run's).
        mode: ``"max"`` or ``"min"`` (with ``monitor``).
    """

    def __init__(self, dirpath: str | os.PathLike, top_k: int = 0, monitor: str | None = None, mode: str = "max"):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"callbacks.average_checkpoints.top_k must be an integer >= 0, got {top_k!r}")
        # Lightning wants a metric for top-k at construction; the run's own replaces the placeholder in setup().
        super().__init__(dirpath=os.fspath(dirpath), filename="epoch{epoch:03d}", monitor=monitor or _RUN_METRIC, mode=mode,
                         save_top_k=top_k, save_weights_only=True, auto_insert_metric_name=False,
                         enable_version_counter=False, save_on_train_epoch_end=True)
        self.top_k = top_k

    @property
    def state_key(self) -> str:
        """Distinct from the main checkpoint callbacks' keys in a checkpoint's ``callbacks`` entry."""
        return f"AverageBestCheckpoints{{dirpath={self.dirpath!r}}}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Takes the run's metric and mode from its main checkpoint callback when no ``monitor`` was given.

        Raises:
            ValueError: averaging is on, no ``monitor`` was given and the run has no other monitored checkpoint.
        """
        if self.monitor == _RUN_METRIC:
            main = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                         and cb is not self and cb.monitor and cb.monitor != _RUN_METRIC), None)
            if main is None and self.top_k > 0:
                raise ValueError("callbacks.average_checkpoints: the run has no monitored checkpoint callback to take "
                                 "the metric from; set callbacks.average_checkpoints.monitor (and .mode)")
            if main is not None:
                self.monitor, self.mode = main.monitor, main.mode
                self.kth_value = torch.tensor(float("-inf") if main.mode == "max" else float("inf"))
                self.best_model_score = None
        super().setup(trainer, pl_module, stage)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Averages the kept checkpoints into ``averaged.ckpt`` next to ``dirpath`` (rank 0)."""
        if self.top_k == 0 or not self.best_k_models:
            return
        if trainer.is_global_zero:
            paths = sorted(self.best_k_models)
            out = Path(str(self.dirpath)).parent / "averaged.ckpt"
            average_checkpoints(paths, out)
            rank_zero_info(f"Averaged the best {len(paths)} checkpoints by {self.monitor} into {out}")
        trainer.strategy.barrier("natzoo_average_checkpoints")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m natzoo.tools.averaging OUT.ckpt IN.ckpt [IN.ckpt ...]``."""
    parser = argparse.ArgumentParser(prog="python -m natzoo.tools.averaging", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the averaged checkpoint to write")
    parser.add_argument("inputs", nargs="+", help="Lightning checkpoints of one model (e.g. checkpoints/top/*.ckpt)")
    args = parser.parse_args(argv)
    try:
        print(average_checkpoints(args.inputs, args.output))
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
