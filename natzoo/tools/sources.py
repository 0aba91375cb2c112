"""Where ``natzoo-export`` and ``natzoo-predict`` take a model from: a run's Lightning checkpoint (``.ckpt``), a timm
folder, an ONNX file (prediction only) or a registered model name, each with its :class:`ModelInfo`.

:func:`source_kind` decides what a ``--model`` / source argument names from cheap checks only (the path exists, its
suffix, whether a name is registered), so wrong kinds are refused before anything is loaded.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from natzoo import models  # noqa: F401  (registers the NAT families with timm)
from natzoo.checkpoints import _HINT, network_weights, read_lightning_checkpoint
from natzoo.tools.model_info import RECORD_KEY, ModelInfo, info_from_checkpoint, info_from_model

__all__ = ["KINDS", "LoadedModel", "OnnxClassifier", "load_model", "onnx_written_by_natzoo",
           "program_written_by_natzoo", "read_program_info", "source_kind"]

KINDS = ("checkpoint", "timm", "onnx", "program", "name")
WRITER = "natzoo-export"
WRITER_KEY = "natzoo_written_by"
_WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".tar", ".npz")
_EXPECTED = ("a run's Lightning checkpoint (.ckpt), a timm folder (config.json + model.safetensors), an ONNX file "
             "(.onnx) or a registered model name (e.g. nat_mini)")


def source_kind(spec: str, argument: str = "model") -> str:
    """What ``spec`` names: one of :data:`KINDS`, from its suffix, whether it is a folder and the timm registry.

    Raises:
        ValueError: a path that does not exist or is empty, a bare weights file (no model description), a file of
            another kind, or a name that is neither a file nor a registered model; the message names ``argument``.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{argument}: expected {_EXPECTED}, got {spec!r}")
    path = Path(spec)
    where = f"{argument}={spec!r}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{where} is a folder without config.json, not a timm model folder; expected {_EXPECTED}")
        return "timm"
    suffix = path.suffix.lower()
    if path.exists():
        if not path.is_file():
            raise ValueError(f"{where} is not a regular file; expected {_EXPECTED}")
        if path.stat().st_size == 0:
            raise ValueError(f"{where} is an empty file (0 bytes); was a save or a copy interrupted?")
        if suffix == ".ckpt":
            return "checkpoint"
        if suffix == ".onnx":
            return "onnx"
        if suffix == ".pt2":
            return "program"
        if suffix in _WEIGHTS_SUFFIXES:
            raise ValueError(f"{where} is a weights file, which does not say which model it holds nor how to feed it; "
                             f"expected {_EXPECTED} (evaluate or fine-tune such files with checkpoint=<file> "
                             "model=<name>)")
        raise ValueError(f"{where}: unknown file kind {suffix or '(no suffix)'!r}; expected {_EXPECTED}")
    if os.sep in spec or "/" in spec or suffix in (".ckpt", ".onnx", ".pt2", *_WEIGHTS_SUFFIXES):
        raise ValueError(f"{where} does not exist")
    if timm.is_model(spec):
        return "name"
    close = [m for m in timm.list_models() if m.startswith(spec.split("_")[0])][:8]
    raise ValueError(f"{where} is neither an existing file or folder nor a registered model (close names: {close}); "
                     f"expected {_EXPECTED}")


@dataclass
class LoadedModel:
    """A PyTorch classifier ready to run, with where it came from.

    Attributes:
        model: the network, in eval mode, on the CPU.
        info: its description (preprocessing, class names).
        kind: one of :data:`KINDS`.
        source: the path or name it was loaded from.
        trained: whether natzoo trained the weights (a checkpoint, or a timm folder natzoo wrote from one).
        pretrained: a registered name's published weights (False: random weights, or another kind).
    """

    model: nn.Module
    info: ModelInfo
    kind: str
    source: str
    trained: bool
    pretrained: bool = False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def load_model(spec: str, *, use_ema: bool = False, pretrained: bool = False, random_weights: bool = False,
               argument: str = "model") -> LoadedModel:
    """Loads a PyTorch classifier and its :class:`ModelInfo` from a checkpoint, a timm folder or a registered name
    (weights-only reads: ``torch.load(weights_only=True)`` or safetensors).

    Args:
        spec: the source (see :func:`source_kind`).
        use_ema: take a checkpoint's EMA weights.
        pretrained: a registered name with its published weights (timm downloads them).
        random_weights: a registered name with random weights (export tests of the pipeline only).
        argument: the command-line name of ``spec`` for messages.

    Raises:
        ValueError: see :func:`source_kind`; an ONNX file or a program (nothing to rebuild in PyTorch); a flag that
            does not apply to the kind; an unreadable or mismatching file (naming it).
    """
    kind = source_kind(spec, argument)
    if use_ema and kind != "checkpoint":
        raise ValueError(f"--ema takes the EMA weights of a Lightning checkpoint; {spec!r} is a {kind} source")
    if (pretrained or random_weights) and kind != "name":
        raise ValueError(f"--pretrained / --random-weights choose the weights of a registered model name; {spec!r} "
                         f"is a {kind} source with its own weights")
    if kind in ("onnx", "program"):
        raise ValueError(f"{argument}={spec!r} is an exported {kind}, not a PyTorch model; export from the checkpoint, "
                         "timm folder or model name it was made from")
    if kind == "checkpoint":
        try:
            checkpoint = read_lightning_checkpoint(spec, key=argument)
        except ValueError as err:
            raise ValueError(str(err).replace(f"; {_HINT}", f"; expected {_EXPECTED}")) from None
        info = info_from_checkpoint(checkpoint, spec)
        model = timm.create_model(info.model_name, num_classes=info.num_classes, **info.model_kwargs)
        try:
            model.load_state_dict(network_weights(checkpoint, use_ema=use_ema))
        except RuntimeError as err:
            raise ValueError(f"{spec}: the weights do not fit the recorded model {info.model_name} "
                             f"({_first_line(err)})") from None
        return LoadedModel(model.eval(), info, kind, spec, trained=True)
    if kind == "timm":
        from natzoo.tools.timm_export import read_timm_folder, written_by_natzoo

        model, info = read_timm_folder(spec)
        trained = written_by_natzoo(spec) and (getattr(model, "pretrained_cfg", None) or {}).get("tag") == "natzoo"
        return LoadedModel(model, info, kind, spec, trained=trained)
    if pretrained == random_weights:
        raise ValueError(f"{argument}={spec!r} is a registered model name: pass --pretrained for its published weights "
                         "or --random-weights (testing the pipeline only: its outputs mean nothing)")
    try:
        model = timm.create_model(spec, pretrained=pretrained)
    except (RuntimeError, OSError, ValueError) as err:
        raise ValueError(f"{spec}: its published weights cannot be loaded ({_first_line(err)})") from None
    return LoadedModel(model.eval(), info_from_model(model, spec), kind, spec, trained=False, pretrained=pretrained)


def onnx_written_by_natzoo(path: str | os.PathLike) -> bool:
    """Whether the ONNX file at ``path`` carries natzoo-export's mark in its metadata."""
    try:
        import onnx

        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # any reader failure: not provably ours
        return False
    return any(p.key == WRITER_KEY and p.value == WRITER for p in proto.metadata_props)


def program_written_by_natzoo(path: str | os.PathLike) -> bool:
    """Whether the ``torch.export`` archive at ``path`` holds natzoo-export's mark among its extra files."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"/extra/{WRITER_KEY}") and archive.read(name) == WRITER.encode()
                       for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class OnnxClassifier:
    """An ONNX classifier in ONNX Runtime with its :class:`ModelInfo`: natzoo-export's record from the file's
    metadata, else (files from elsewhere) the graph's input size with timm's default ImageNet preprocessing and
    class indices, noted in :attr:`ModelInfo.assumed`.

    Raises:
        ValueError: ONNX Runtime is missing, or the file cannot be opened (naming it).
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError("predicting with an ONNX file needs ONNX Runtime: pip install 'natzoo[export]'") from None
        self.path = str(path)
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(self.path, providers=providers)
        except Exception as err:  # ONNX Runtime raises its own exception types for every kind of bad file
            raise ValueError(f"{self.path} cannot be opened as an ONNX model ({_first_line(err)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{self.path}: expected a classifier with one input and one output, found "
                             f"{len(inputs)} inputs and {len(outputs)} outputs")
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        self.batch = shape[0] if isinstance(shape[0], int) else None  # a fixed batch size, or None (dynamic)
        metadata = self.session.get_modelmeta().custom_metadata_map
        if RECORD_KEY in metadata:
            self.info = ModelInfo.from_json(metadata[RECORD_KEY], self.path)
        else:
            self.info = self._assumed_info(shape, outputs[0].shape)
        # A dynamic-resolution file records its size range; ONNX Runtime does not check it (an image below the range
        # fails deep in a gather), so the size this file will be fed is checked here, from the metadata already read.
        from natzoo.tools.export import check_onnx_input_size

        check_onnx_input_size(self.path, self.info.input_size[1], self.info.input_size[2], dict(metadata))

    def _assumed_info(self, shape: list[Any], output: list[Any]) -> ModelInfo:
        from timm.data import resolve_data_config

        if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]) or not isinstance(output[-1], int):
            raise ValueError(f"{self.path} records no preprocessing (not written by natzoo-export) and its input "
                             f"{shape} / output {output} shapes do not give the size and class count")
        data = resolve_data_config(args={"input_size": tuple(shape[1:])})
        data = {k: data[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")}
        assumed = (f"{self.path} records no preprocessing nor class names (not written by natzoo-export): assuming "
                   f"timm's defaults ({shape[2]}x{shape[3]} px from the graph, {data['interpolation']}, crop_pct "
                   f"{data['crop_pct']}, ImageNet mean/std) and naming the classes by index")
        return ModelInfo("onnx", int(output[-1]), {}, data, None, assumed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, classes]`` of images ``[B, 3, H, W]`` (a fixed-batch graph runs padded chunks)."""
        x = images.detach().cpu().numpy().astype(np.float32)
        if self.batch is None:
            return torch.from_numpy(self._run(x))
        parts = []
        for start in range(0, len(x), self.batch):
            chunk = x[start:start + self.batch]
            padded = np.concatenate([chunk, np.zeros((self.batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            parts.append(self._run(padded)[:len(chunk)])
        return torch.from_numpy(np.concatenate(parts))

    def _run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: x})[0])


def read_program_info(path: str | os.PathLike) -> ModelInfo | None:
    """The :class:`ModelInfo` natzoo-export stored in a ``torch.export`` archive, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/extra/natzoo_model.json")), None)
            return ModelInfo.from_record(json.loads(archive.read(name)), str(path)) if name else None
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
