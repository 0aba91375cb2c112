"""A trained classifier in the layout timm loads: ``model.safetensors`` + ``config.json`` (architecture, its
arguments, ``num_classes``, label names and the evaluation preprocessing), written by timm's own hub helper
``save_for_hf``. ``timm.create_model("local-dir:<folder>", pretrained=True)`` rebuilds the model with the trained head
(after ``import natzoo.models``, which registers the architectures); ``timm.data.resolve_data_config(model=...)``
gives its preprocessing. Pushing the folder to a hub is optional and left to timm (``timm.models.push_to_hf_hub``):
nothing here touches the network.

During training the ``timm_model`` callback (``configs/callbacks/default.yaml``, ``enabled: false`` = off) writes
the best checkpoint's model to ``<run dir>/timm_model/`` with the run's preprocessing and class names. After
training, :func:`export_checkpoint` (``python -m natzoo.tools.timm_export CKPT FOLDER``, or ``natzoo-export CKPT -o
FOLDER``) does the same from a checkpoint.

A folder natzoo writes records in ``config.json``'s extra top-level entry ``natzoo`` that natzoo wrote it (with the
size of its weights file: the proof :func:`save_timm_model` needs before it replaces a folder) and the model's
:class:`natzoo.tools.model_info.ModelInfo`. A model natzoo trained is labelled as such (tag ``natzoo``, a note naming
the checkpoint, no origin URL or license of the official weights), never as the architecture's official ImageNet
model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import timm
from lightning.pytorch.utilities import rank_zero_info
from safetensors import SafetensorError
from timm.models import save_for_hf
from torch import nn

from natzoo import models  # noqa: F401  (registers the NAT families with timm)
from natzoo.checkpoints import network_weights, read_lightning_checkpoint
from natzoo.models import WEIGHT_FILES, check_folder_weights
from natzoo.ownership import scratch_prefix
from natzoo.tools.model_info import RECORD_KEY, ModelInfo, data_config_of, info_from_checkpoint, info_from_model

__all__ = ["SaveTimmModel", "export_checkpoint", "read_timm_folder", "save_timm_model", "written_by_natzoo"]

log = logging.getLogger(__name__)

_FILES = ("config.json", "model.safetensors")
# config.json's top-level entry (timm ignores it) that proves natzoo wrote the folder and holds its ModelInfo record.
_MARK = "natzoo"
_WRITER = "natzoo.tools.timm_export"


def written_by_natzoo(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds exactly what :func:`save_timm_model` wrote: only its two files, ``config.json``
    naming natzoo as the writer and the weights file at the size it recorded."""
    out = Path(folder)
    if not out.is_dir() or out.is_symlink() or any(p.name not in _FILES or not p.is_file() for p in out.iterdir()):
        return False
    try:
        mark = json.loads((out / "config.json").read_text()).get(_MARK)
        size = (out / "model.safetensors").stat().st_size
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(mark, dict) and mark.get("written_by") == _WRITER and mark.get("files") == {
        "model.safetensors": size}


def _own_model_cfg(trained_from: str) -> dict[str, Any]:
    """pretrained_cfg fields of weights that are not the official ones of the architecture's cfg (a model natzoo
    trained, or random weights)."""
    return {"tag": "natzoo", "origin_url": None, "license": None, "hf_hub_id": None, "url": None,
            "notes": [f"{trained_from}; not the official SHI-Labs weights of this architecture."]}


def save_timm_model(model: nn.Module, folder: str | os.PathLike, data_config: dict[str, Any] | None = None,
                    label_names: Sequence[str] | None = None, *, trained_from: str | None = None,
                    model_kwargs: dict[str, Any] | None = None) -> Path:
    """Writes ``model`` (made by ``timm.create_model``) to ``folder`` in timm's layout, replacing the folder as a
    whole once both files are written.

    Args:
        model: the network; its constructor arguments are recorded by timm's factory.
        folder: the output folder; it must not exist, be empty, or hold a model this function wrote
            (:func:`written_by_natzoo`).
        data_config: evaluation preprocessing (``input_size``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``,
            ``interpolation``); None: the model's pretrained config.
        label_names: class names, in output order.
        trained_from: where the weights come from when they are not the architecture's published ones (e.g.
            ``"Trained with natzoo: <checkpoint>"``): the folder is then labelled as that model (tag ``natzoo``, a note naming it) instead of the architecture's official weights
            (tag ``in1k``, the SHI-Labs origin and notes). None: the model's own pretrained config is kept.
        model_kwargs: the constructor arguments to record in natzoo's description (besides timm's ``model_args``).

    Raises:
        ValueError: ``folder`` holds other files or a model natzoo did not write, or ``label_names`` does not match
            the classifier.
    """
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(p.name not in _FILES for p in out.iterdir())):
        raise ValueError(f"{out} exists and holds other files than {list(_FILES)}; choose an empty or new folder")
    if out.exists() and any(out.iterdir()) and not written_by_natzoo(out):
        raise ValueError(f"{out} holds a timm model that natzoo did not write (its config.json has no {_MARK!r} entry "
                         "matching its weights); it is not replaced: choose an empty or new folder")
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if label_names is not None and len(label_names) != num_classes:
        raise ValueError(f"label_names has {len(label_names)} names but the model has {num_classes} classes")
    model_config: dict[str, Any] = {"label_names": list(label_names)} if label_names is not None else {}
    if trained_from is not None:
        model_config["pretrained_cfg"] = _own_model_cfg(trained_from)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=scratch_prefix(out.name, "partial"), dir=out.parent))
    try:
        save_for_hf(model, str(staging), model_config=model_config or None, safe_serialization=True,
                    data_config=dict(data_config) if data_config else None)
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        name = str(config["architecture"])  # timm's save_config_for_hf always writes it
        info = info_from_model(model, name, label_names, model_kwargs)
        if data_config:
            info = replace(info, data_config={**info.data_config, **{k: v for k, v in data_config.items()
                                                                     if k in info.data_config}})
        config[_MARK] = {"written_by": _WRITER, "files": {"model.safetensors": (staging / "model.safetensors")
                                                          .stat().st_size}, RECORD_KEY: info.to_record()}
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp creates 0700; give the folder the usual permissions
        if out.exists():
            for name in _FILES:  # only natzoo's own two files, checked above
                (out / name).unlink(missing_ok=True)
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def read_timm_folder(folder: str | os.PathLike) -> tuple[nn.Module, ModelInfo]:
    """The model of a timm folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, from natzoo or
    timm) and its description: natzoo's record when natzoo wrote it, else timm's data config and label names.

    Both files are checked before the model is built, so a damaged one is named with what is wrong with it: a
    ``config.json`` that is empty, truncated or not JSON, a weights file that is truncated or not of its kind
    (:func:`natzoo.models.damaged_weights`).

    Raises:
        ValueError: the folder lacks either file, or its config or weights cannot be read (naming the file).
    """
    out = Path(folder)
    config_file = out / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{out} is not a timm model folder: it has no config.json (a timm folder holds config.json "
                         f"and {' or '.join(WEIGHT_FILES)})")
    weights = next((out / name for name in WEIGHT_FILES if (out / name).is_file()), None)
    if weights is None:
        raise ValueError(f"{out} is not a timm model folder: it has neither {' nor '.join(WEIGHT_FILES)} (a timm "
                         "folder holds config.json and one of them)")
    config = _read_config_json(config_file)
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ValueError(f"{config_file} is not a timm model config (no 'architecture')")
    check_folder_weights(out)
    mark = config.get(_MARK)
    info = ModelInfo.from_record(mark[RECORD_KEY], str(out)) if isinstance(mark, dict) and RECORD_KEY in mark \
        else None
    try:
        model = timm.create_model(f"local-dir:{out}", pretrained=True)
    except (RuntimeError, ValueError, OSError, KeyError, SafetensorError) as err:
        raise ValueError(f"{out}: the timm model cannot be built from config.json and {weights.name} "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    return model.eval(), info if info is not None else info_from_model(model, config["architecture"],
                                                                       model_kwargs=config.get("model_args"))


def _read_config_json(path: Path) -> Any:
    """``config.json`` parsed; an empty, truncated (an object that is never closed) or non-JSON file is named."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} cannot be read as JSON ({type(err).__name__}: {err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if not text.strip():
            what = "empty"
        elif text.lstrip().startswith("{") and not text.rstrip().endswith("}"):
            what = (f"truncated: its JSON object is not closed after {len(text)} characters (an interrupted copy or "
                    "download?)")
        else:
            what = "not JSON"
        raise ValueError(f"{path} is {what} ({err})") from None


def _data_config(img_size: int, mean: Sequence[float], std: Sequence[float], evaluation: dict[str, Any]) -> dict:
    return data_config_of(img_size, mean, std, evaluation)


def export_checkpoint(ckpt_path: str | os.PathLike, folder: str | os.PathLike, use_ema: bool = False,
                      data_config: dict[str, Any] | None = None, label_names: Sequence[str] | None = None) -> Path:
    """Writes the classifier of a Lightning checkpoint of this project (``train.py``'s ``best.ckpt``, or an
    ``averaged.ckpt``) to ``folder`` in timm's layout (read weights-only), labelled as a model natzoo trained.

    Args:
        ckpt_path: the checkpoint.
        folder: the output folder (see :func:`save_timm_model`).
        use_ema: export the EMA weights.
        data_config: evaluation preprocessing, or some of its keys (e.g. ``input_size``); None: what the checkpoint
            records (:mod:`natzoo.tools.model_info`; for checkpoints that record none, the model's pretrained
            config, with a logged note).
        label_names: class names; None: the recorded ones.

    Raises:
        ValueError: not a classification checkpoint of this project, or see :func:`save_timm_model`.
    """
    checkpoint = read_lightning_checkpoint(ckpt_path, key="ckpt_path")
    info = info_from_checkpoint(checkpoint, str(ckpt_path))
    if info.assumed:
        log.warning("%s", info.assumed)
    model = timm.create_model(info.model_name, num_classes=info.num_classes, **info.model_kwargs)
    model.load_state_dict(network_weights(checkpoint, use_ema=use_ema))
    data = {**info.data_config, **(data_config or {})}
    names = label_names if label_names is not None else info.label_names
    return save_timm_model(model.eval(), folder, data_config=data, label_names=names, trained_from=f"Trained with natzoo: {ckpt_path}",
                           model_kwargs=info.model_kwargs)


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
            out = save_timm_model(model.eval(), self.dirpath, data_config, names,
                                  trained_from="Trained with natzoo: the final weights of the run", model_kwargs=hparams.get("model_kwargs"))
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
