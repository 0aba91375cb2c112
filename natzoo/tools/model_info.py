"""What a saved model needs besides its weights to be rebuilt and fed exactly as it was evaluated.

Every file natzoo writes for a classifier carries a :class:`ModelInfo` (docs/export.md, "What a checkpoint records"):

* Lightning checkpoints (``best.ckpt``, ``last.ckpt``, the kept ``top/*.ckpt`` and the ``averaged.ckpt`` made from
  them) hold it as a plain dictionary under the top-level key ``natzoo_model`` (readable with ``weights_only=True``);
* a timm folder holds it in timm's own places in ``config.json``: ``architecture``, ``model_args``, ``num_classes``,
  ``label_names`` and the data config in ``pretrained_cfg``;
* an ONNX file holds it as JSON in the metadata property ``natzoo_model``; a ``torch.export`` program as the extra
  file ``natzoo_model.json``.

The preprocessing is a timm data config (the keys of :data:`DATA_KEYS`, as ``timm.data.resolve_data_config`` returns
them) and becomes the evaluation transform through ``timm.data.create_transform``. Files written before these
records existed still load: the preprocessing is taken from the run's ``.hydra/config.yaml`` when the checkpoint is
still in its run directory, else from the model's pretrained config, the classes are named by their index, and
:attr:`ModelInfo.assumed` says so in one sentence.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg

__all__ = ["DATA_KEYS", "RECORD_KEY", "ModelInfo", "data_config_of", "info_from_checkpoint", "info_from_model",
           "record_for_module"]

RECORD_KEY = "natzoo_model"
_FORMAT = 1
DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")

# What create_transform(is_training=False) uses for an argument it is not given: the evaluation transform of a data
# module built without a value used these, so the record must hold them too.
_TRANSFORM_DEFAULTS = {name: p.default for name, p in inspect.signature(create_transform).parameters.items()
                       if name in ("interpolation", "crop_pct", "crop_mode")}


def _plain(value: Any) -> Any:
    """JSON-like copy (tuples become lists) that ``torch.load(weights_only=True)`` and ``json`` both read back."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def data_config_of(img_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                   eval_transform: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The timm data config of an evaluation transform ``create_transform(input_size, mean=, std=, **eval_transform)``,
    with create_transform's own defaults filled in for the crop and interpolation it was not given."""
    size = (int(img_size), int(img_size)) if isinstance(img_size, int) else tuple(int(s) for s in img_size)[-2:]
    config: dict[str, Any] = {"input_size": (3, *size), "mean": tuple(float(v) for v in mean),
                              "std": tuple(float(v) for v in std)}
    given = dict(eval_transform or {})
    for key, default in _TRANSFORM_DEFAULTS.items():
        config[key] = given.get(key) if given.get(key) is not None else default
    if config["crop_pct"] is None:
        from timm.data import DEFAULT_CROP_PCT

        config["crop_pct"] = DEFAULT_CROP_PCT
    return config


def _check_data_config(config: Any, source: str) -> dict[str, Any]:
    if not isinstance(config, Mapping) or not set(DATA_KEYS) <= config.keys():
        raise ValueError(f"{source}: the recorded preprocessing {config!r} lacks some of {list(DATA_KEYS)}")
    size = config["input_size"]
    if not isinstance(size, (list, tuple)) or len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"{source}: the recorded input_size {size!r} is not (channels, height, width)")
    out = {k: config[k] for k in DATA_KEYS}
    out["input_size"] = tuple(size)
    out["mean"], out["std"] = tuple(config["mean"]), tuple(config["std"])
    return out


@dataclass(frozen=True)
class ModelInfo:
    """A classifier's description: how to build it, how to feed it and what its outputs mean.

    Attributes:
        model_name: timm registry name (``nat_mini``).
        num_classes: classifier outputs.
        model_kwargs: constructor arguments beyond ``num_classes`` (``embed_dim``, ``depths``, ...).
        data_config: evaluation preprocessing, the keys of :data:`DATA_KEYS` (timm's data-config convention).
        label_names: class names in output order; None when the file records none (indices are used).
        assumed: for files that record less than this: one sentence naming what was assumed; else None.
    """

    model_name: str
    num_classes: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)
    label_names: tuple[str, ...] | None = None
    assumed: str | None = None

    @property
    def labels(self) -> list[str]:
        """Class names, or the class indices as strings when none are recorded."""
        return list(self.label_names) if self.label_names is not None else [str(i) for i in range(self.num_classes)]

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` the model is fed."""
        return tuple(self.data_config["input_size"])

    def to_record(self) -> dict[str, Any]:
        """Plain values for a checkpoint's ``natzoo_model`` entry or a JSON metadata field."""
        return _plain({"format": _FORMAT, "model_name": self.model_name, "num_classes": self.num_classes,
                       "model_kwargs": self.model_kwargs, "data_config": self.data_config,
                       "label_names": self.label_names})

    def to_json(self) -> str:
        """:meth:`to_record` as JSON text."""
        return json.dumps(self.to_record(), sort_keys=True)

    @classmethod
    def from_record(cls, record: Any, source: str) -> ModelInfo:
        """Reads a :meth:`to_record` dictionary.

        Raises:
            ValueError: the record is not one (naming ``source`` and what is wrong).
        """
        if not isinstance(record, Mapping) or not isinstance(record.get("model_name"), str):
            raise ValueError(f"{source}: the {RECORD_KEY!r} record is not a natzoo model description: {record!r:.200}")
        if record.get("format") != _FORMAT:
            raise ValueError(f"{source}: model description format {record.get('format')!r}; this natzoo reads "
                             f"format {_FORMAT} (a newer natzoo wrote it?)")
        num_classes = record.get("num_classes")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"{source}: the recorded num_classes {num_classes!r} is not a count")
        names = record.get("label_names")
        if names is not None and (len(names) != num_classes or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"{source}: {len(names)} recorded class names for {num_classes} classes")
        return cls(record["model_name"], num_classes, dict(record.get("model_kwargs") or {}),
                   _check_data_config(record.get("data_config"), source),
                   tuple(names) if names is not None else None)

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelInfo:
        """Reads :meth:`to_json` text (see :meth:`from_record`)."""
        try:
            record = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{source}: the model description is not JSON ({err})") from None
        return cls.from_record(record, source)

    def with_input_size(self, height: int, width: int) -> ModelInfo:
        """The same description at another input size (the crop and normalisation kept)."""
        return replace(self, data_config={**self.data_config, "input_size": (self.input_size[0], height, width)})

    def transform(self) -> Callable:
        """The evaluation transform (PIL image -> normalised ``[3, H, W]`` tensor): ``timm.data.create_transform``."""
        return create_transform(**self.data_config, is_training=False)

    def describe(self) -> str:
        """One line: model, classes and preprocessing."""
        c = self.data_config
        names = ", ".join(self.labels[:4]) + (", ..." if self.num_classes > 4 else "")
        return (f"{self.model_name}, {self.num_classes} classes ({names}); input {c['input_size'][1]}x"
                f"{c['input_size'][2]}, {c['interpolation']}, crop {c['crop_pct']} {c['crop_mode']}, mean "
                f"{tuple(round(v, 4) for v in c['mean'])}, std {tuple(round(v, 4) for v in c['std'])}")


def _pretrained_data_config(model_name: str) -> dict[str, Any]:
    """The data config timm resolves from the registered model's pretrained config alone."""
    pretrained = get_pretrained_cfg(model_name)
    resolved = resolve_data_config(args={}, pretrained_cfg=pretrained.to_dict() if pretrained is not None else {})
    return _check_data_config(resolved, model_name)


def record_for_module(hparams: Mapping[str, Any], datamodule: Any) -> dict[str, Any] | None:
    """The ``natzoo_model`` record of a classification LightningModule's checkpoint, or None when the hyper-parameters
    name no classifier.

    Args:
        hparams: the module's saved hyper-parameters (``model_name``, ``num_classes``, ``model_kwargs``).
        datamodule: the trainer's data module; its ``img_size``, ``mean``, ``std``, ``eval_transform_args`` and
            ``classes`` give the preprocessing and the class names (a data module without them: the model's
            pretrained preprocessing, no names).
    """
    if "model_name" not in hparams or "num_classes" not in hparams:
        return None
    name, num_classes = str(hparams["model_name"]), int(hparams["num_classes"])
    if datamodule is not None and all(hasattr(datamodule, a) for a in ("img_size", "mean", "std")):
        data = data_config_of(datamodule.img_size, datamodule.mean, datamodule.std,
                              getattr(datamodule, "eval_transform_args", None))
    else:
        data = _pretrained_data_config(name)
    classes = list(getattr(datamodule, "classes", None) or [])
    names = tuple(str(c) for c in classes) if len(classes) == num_classes else None
    return ModelInfo(name, num_classes, dict(hparams.get("model_kwargs") or {}), data, names).to_record()


def _run_config_value(cfg: Any, key: str) -> Any:
    """A plain value of a saved Hydra config, or None when it is missing or does not resolve outside Hydra."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    except Exception:  # any interpolation that needs the Hydra runtime: treated as unset
        return None


def _run_data_config(checkpoint_path: str | os.PathLike, model_name: str) -> tuple[dict[str, Any], str] | None:
    """The evaluation preprocessing of the run that wrote ``checkpoint_path`` (``<run>/checkpoints/*.ckpt`` or
    ``<run>/checkpoints/top/*.ckpt``), from its ``.hydra/config.yaml`` as the classification task resolves it (the
    config's values, the model's pretrained config for the unset ones), and that file; None without one."""
    from omegaconf import OmegaConf

    path = Path(checkpoint_path).absolute()
    record = next((p / ".hydra" / "config.yaml" for p in list(path.parents)[:3] if (p / ".hydra" / "config.yaml")
                   .is_file()), None)
    if record is None:
        return None
    try:
        cfg = OmegaConf.load(record)
    except Exception:  # an unreadable or foreign file: the pretrained preprocessing is assumed instead
        return None
    size = _run_config_value(cfg, "data.img_size")
    evaluation = _run_config_value(cfg, "data.eval_transform") or {}
    given = {"input_size": (3, int(size), int(size)) if isinstance(size, int) else None,
             "mean": _run_config_value(cfg, "data.mean"), "std": _run_config_value(cfg, "data.std"),
             **{k: evaluation.get(k) for k in ("crop_pct", "crop_mode", "interpolation")
                if isinstance(evaluation, dict)}}
    pretrained = get_pretrained_cfg(model_name)
    try:
        resolved = resolve_data_config(args={k: v for k, v in given.items() if v is not None},
                                       pretrained_cfg=pretrained.to_dict() if pretrained is not None else {})
        return _check_data_config(resolved, str(record)), str(record)
    except (ValueError, TypeError):
        return None


def info_from_checkpoint(checkpoint: Mapping[str, Any], source: str) -> ModelInfo:
    """The :class:`ModelInfo` of a Lightning checkpoint of natzoo's classification task (``source``: its path).

    A checkpoint written before natzoo recorded it is described from its hyper-parameters, the preprocessing of the
    run that wrote it (its ``.hydra/config.yaml``, when the checkpoint is still in its run directory; else the model's
    pretrained preprocessing) and class indices, with :attr:`ModelInfo.assumed` saying so.

    Raises:
        ValueError: not a classification checkpoint (no ``model_name``/``num_classes``), or a broken record.
    """
    record = checkpoint.get(RECORD_KEY)
    if record is not None:
        return ModelInfo.from_record(record, source)
    hparams = checkpoint.get("hyper_parameters") or {}
    if "model_name" not in hparams or "num_classes" not in hparams:
        raise ValueError(f"{source} is not a classification checkpoint of natzoo (its hyper-parameters name no "
                         f"model_name/num_classes: {sorted(hparams)[:8]})")
    name = str(hparams["model_name"])
    from_run = _run_data_config(source, name)
    data, origin = from_run if from_run is not None else (_pretrained_data_config(name), f"{name}'s pretrained config")
    size = data["input_size"]
    assumed = (f"{source} was written before natzoo recorded preprocessing and class names: using the preprocessing "
               f"of {origin} ({size[1]}x{size[2]} px, {data['interpolation']}, crop_pct {data['crop_pct']}, mean "
               f"{tuple(round(v, 3) for v in data['mean'])}) and naming the classes by index"
               + ("" if from_run is not None else "; if the run trained at another size or normalisation, pass "
                  "--img-size (natzoo-export)"))
    return ModelInfo(name, int(hparams["num_classes"]), dict(hparams.get("model_kwargs") or {}), data, None, assumed)


def info_from_model(model: Any, model_name: str, label_names: Sequence[str] | None = None,
                    model_kwargs: Mapping[str, Any] | None = None) -> ModelInfo:
    """The :class:`ModelInfo` of a model made by ``timm.create_model`` (a registered name or a timm folder): its
    preprocessing by ``timm.data.resolve_data_config(model=...)`` and the class names of its pretrained config unless
    given."""
    data = _check_data_config(resolve_data_config(args={}, model=model), model_name)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    names = label_names if label_names is not None else (getattr(model, "pretrained_cfg", None) or {}).get(
        "label_names")
    if names is not None and (isinstance(names, Mapping) or len(names) != num_classes):
        names = None  # an id -> name mapping with gaps, or names of another head: indices instead
    return ModelInfo(model_name, num_classes, dict(model_kwargs or {}), data,
                     tuple(str(n) for n in names) if names is not None else None)
