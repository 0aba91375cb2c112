"""A trained classifier in the layout timm loads: ``model.safetensors`` + ``config.json`` (architecture, its
arguments, ``num_classes``, label names and the evaluation preprocessing), written by timm's own hub helper
``save_for_hf``. ``timm.create_model("local-dir:<folder>", pretrained=True)`` rebuilds the model with the trained head
(after ``import natzoo.models``, which registers the architectures); ``timm.data.resolve_data_config(model=...)``
gives its preprocessing. Pushing the folder to a hub is optional and left to timm (``timm.models.push_to_hf_hub``):
nothing here touches the network.

During training the ``timm_model`` callback (``configs/callbacks/default.yaml``, ``enabled: false`` = off) writes
the best checkpoint's model to ``<run dir>/timm_model/`` with the run's preprocessing and class names. After
training, :func:`export_checkpoint` (``python -m natzoo.tools.timm_export CKPT FOLDER``) does the same from a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import timm
from lightning.pytorch.utilities import rank_zero_info
from timm.models import save_for_hf
from torch import nn

from natzoo import models  # noqa: F401  (registers the NAT families with timm)
from natzoo.checkpoints import network_weights, read_lightning_checkpoint

__all__ = ["SaveTimmModel", "export_checkpoint", "save_timm_model"]

_FILES = ("config.json", "model.safetensors")


def save_timm_model(model: nn.Module, folder: str | os.PathLike, data_config: dict[str, Any] | None = None,
                    label_names: Sequence[str] | None = None) -> Path:
    """Writes ``model`` (made by ``timm.create_model``) to ``folder`` in timm's layout, replacing the folder as a
    whole once both files are written.

    Args:
        model: the network; its constructor arguments are recorded by timm's factory.
        folder: the output folder; it must not exist, or hold only a model this function wrote.
        data_config: evaluation preprocessing (``input_size``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``,
            ``interpolation``); None: the model's pretrained config.
        label_names: class names, in output order.

    Raises:
        ValueError: ``folder`` holds other files, or ``label_names`` does not match the classifier.
    """
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(p.name not in _FILES for p in out.iterdir())):
        raise ValueError(f"{out} exists and holds other files than {list(_FILES)}; choose an empty or new folder")
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if label_names is not None and len(label_names) != num_classes:
        raise ValueError(f"label_names has {len(label_names)} names but the model has {num_classes} classes")
    model_config = {"label_names": list(label_names)} if label_names is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_for_hf(model, str(staging), model_config=model_config, safe_serialization=True,
                    data_config=dict(data_config) if data_config else None)
        if out.exists():
            shutil.rmtree(out)  # only config.json / model.safetensors, checked above
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def _data_config(img_size: int, mean: Sequence[float], std: Sequence[float], evaluation: dict[str, Any]) -> dict:
    config: dict[str, Any] = {"input_size": (3, int(img_size), int(img_size)), "mean": tuple(mean), "std": tuple(std)}
    config.update({k: v for k, v in evaluation.items() if k in ("crop_pct", "crop_mode", "interpolation")
                   and v is not None})
    return config


def export_checkpoint(ckpt_path: str | os.PathLike, folder: str | os.PathLike, use_ema: bool = False,
                      data_config: dict[str, Any] | None = None, label_names: Sequence[str] | None = None) -> Path:
    """Writes the classifier of a Lightning checkpoint of this project (``train.py``'s ``best.ckpt``, or an
    ``averaged.ckpt``) to ``folder`` in timm's layout (read weights-only).

    Args:
        ckpt_path: the checkpoint.
        folder: the output folder (see :func:`save_timm_model`).
        use_ema: export the EMA weights.
        data_config: evaluation preprocessing; None: the model's pretrained config (pass the run's when it trained at
            another size).
        label_names: class names (the sorted folder names of the training set).

    Raises:
        ValueError: not a classification checkpoint of this project, or see :func:`save_timm_model`.
    """
    checkpoint = read_lightning_checkpoint(ckpt_path, key="ckpt_path")
    hparams = checkpoint.get("hyper_parameters") or {}
    if "model_name" not in hparams or "num_classes" not in hparams:
        raise ValueError(f"{ckpt_path} is not a classification checkpoint of natzoo (no model_name/num_classes)")
    model = timm.create_model(hparams["model_name"], num_classes=int(hparams["num_classes"]),
                              **(hparams.get("model_kwargs") or {}))
    model.load_state_dict(network_weights(checkpoint, use_ema=use_ema))
    return save_timm_model(model.eval(), folder, data_config=data_config, label_names=label_names)


class SaveTimmModel(pl.Callback):
    """When training ends, writes the best checkpoint's classifier (or the final weights without one) in timm's
    layout to ``dirpath``, with the data module's evaluation preprocessing and class names.

    Args:
        dirpath: the output folder.
        enabled: off unless true.
        use_ema: export the EMA weights.
    """

    def __init__(self, dirpath: str | os.PathLike, enabled: bool = False, use_ema: bool = False):
        self.dirpath = Path(dirpath)
        self.enabled = bool(enabled)
        self.use_ema = bool(use_ema)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Exports on rank 0 (classification modules only)."""
        if not self.enabled or not trainer.is_global_zero:
            return
        datamodule = getattr(trainer, "datamodule", None)  # set by Trainer.fit; not in Lightning's annotations
        data_config = None
        if datamodule is not None and hasattr(datamodule, "eval_transform_args"):
            data_config = _data_config(datamodule.img_size, datamodule.mean, datamodule.std,
                                       datamodule.eval_transform_args)
        names = list(getattr(datamodule, "classes", None) or []) or None
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        if best:
            out = export_checkpoint(best, self.dirpath, self.use_ema, data_config, names)
        else:
            hparams = pl_module.hparams
            model = timm.create_model(hparams["model_name"], num_classes=int(hparams["num_classes"]),
                                      **(hparams.get("model_kwargs") or {}))
            source = getattr(pl_module, "model_ema").module if self.use_ema else getattr(pl_module, "model")
            model.load_state_dict(source.state_dict())
            out = save_timm_model(model.eval(), self.dirpath, data_config, names)
        rank_zero_info(f"Saved the {'best' if best else 'final'} model in timm's layout to {out} "
                       f"(timm.create_model('local-dir:{out}', pretrained=True) after import natzoo.models)")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m natzoo.tools.timm_export CKPT FOLDER [--use-ema] [--img-size N]``."""
    parser = argparse.ArgumentParser(prog="python -m natzoo.tools.timm_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_path", help="a Lightning checkpoint written by train.py (best.ckpt, averaged.ckpt)")
    parser.add_argument("folder", help="the output folder (new, or one this command wrote)")
    parser.add_argument("--use-ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--img-size", type=int, default=None, help="evaluation input size (default: the model's)")
    args = parser.parse_args(argv)
    data_config = {"input_size": (3, args.img_size, args.img_size)} if args.img_size else None
    try:
        print(export_checkpoint(args.ckpt_path, args.folder, use_ema=args.use_ema, data_config=data_config))
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
