"""Reading weight files and loading them into models: the one path every loading route takes.

* timm's ``pretrained=True`` (the cfg's URL, an ``hf_hub_id`` or ``pretrained_cfg_overlay=dict(file=...)``) and
  ``torch.hub`` ``checkpoint=``: the families fetch remote sources to a local file first (:func:`local_weights`),
  then timm hands the file to the model's ``load_pretrained`` (the cfgs set timm's ``custom_load``), which calls
  :func:`load_weights`. A ``state_dict`` overlay reaches it through timm's filter hook
  (:func:`load_state_dict_overlay`).
* ``train.py``/``eval.py`` ``checkpoint=`` and the detection backbone call :func:`load_weights` directly.

Files are read with ``torch.load(weights_only=True)`` or safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CHECKPOINT_SHA256",
    "WEIGHT_FILES",
    "LoadReport",
    "check_folder_weights",
    "damaged_weights",
    "load_state_dict_overlay",
    "load_weights",
    "local_weights",
    "pretrained_file",
    "read_state_dict",
    "resize_rpb",
    "sha256_file",
    "unwrap_state_dict",
]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# SHA-256 of official files, keyed 'variant.tag'. The DiNAT-Large files were replaced upstream on 2023-01-17 and
# outputs depend on the version held, so record the hash of the file you validated here: a pretrained file of that
# tag (downloaded, or given through pretrained_cfg_overlay=dict(file=...)) is then checked against it. None: unknown.
CHECKPOINT_SHA256: dict[str, str | None] = {
    "dinat_large.in22k_ft_in1k": None,
    "dinat_large.in22k": None,
    "dinat_large_384.in22k_ft_in1k": None,
    "dinat_large_384_11x11.in22k_ft_in1k": None,
    "dinat_large_11x11.in22k": None,
}

EXPECTED_FILE = (
    "a weights file: a state dict, or a checkpoint holding one under 'model', 'state_dict' or 'state_dict_ema', "
    "written by torch.save (.pth/.pt/.bin/.ckpt) or safetensors (.safetensors)"
)
_CONTAINER_KEYS = ("model", "state_dict")
_EMA_KEYS = ("state_dict_ema", "model_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_HEAD_MODES = ("auto", "strict", "adopt")
_LISTED_KEYS = 30  # keys listed per kind in a mismatch message


def unwrap_state_dict(checkpoint: Any, use_ema: bool = False, source: str = "checkpoint") -> StateDict:
    """Returns the flat name -> tensor dict inside a checkpoint.

    Args:
        checkpoint: A flat state dict or a training checkpoint holding one under ``model``, ``state_dict`` or
            ``state_dict_ema``/``model_ema`` (nested up to three levels).
        use_ema: Prefer the EMA weights when the checkpoint holds both; without it the EMA weights are used only
            when nothing else is there.
        source: How to name the checkpoint in errors.

    Returns:
        The tensors with DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes removed. Prefixes
        of a training framework (a LightningModule's ``model.``) are the training code's to strip.

    Raises:
        ValueError: `checkpoint` is not a mapping or holds no tensors.
    """
    if not isinstance(checkpoint, Mapping):
        kind = type(checkpoint).__name__
        # A ValueError: what is wrong is the content of a file, not the type of an argument.
        raise ValueError(f"{source} holds a {kind}, not a state dict; expected {EXPECTED_FILE}")  # noqa: TRY004
    obj: Any = checkpoint
    for _ in range(3):
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        order = _EMA_KEYS + _CONTAINER_KEYS if use_ema else _CONTAINER_KEYS + _EMA_KEYS
        inner = next((obj[k] for k in order if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{source} holds no tensors (top-level keys {sorted(map(str, checkpoint))[:10]}); expected "
                         f"{EXPECTED_FILE}")
    for prefix in _WRAPPER_PREFIXES:
        tensors = {(k.removeprefix(prefix)): v for k, v in tensors.items()}
    return tensors


def read_state_dict(path: str | os.PathLike[str], use_ema: bool = False) -> StateDict:
    """Reads a weights file without unpickling code and returns its flat state dict (see
    :func:`unwrap_state_dict`), on the CPU, in the file's own key layout.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is a directory, empty, unreadable as weights, or holds no tensors; the message names it.
    """
    path = os.fspath(path)
    source = f"checkpoint {path!r}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{source} does not exist; expected {EXPECTED_FILE}")
    if os.path.isdir(path):
        raise ValueError(f"{source} is a directory; expected {EXPECTED_FILE} (pass the file inside it)")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{source} is empty (0 bytes; an interrupted download or copy?); expected {EXPECTED_FILE}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            checkpoint = load_file(path, device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure is reported with the file and what was expected
        damage = damaged_weights(path)
        if damage is not None:
            raise ValueError(f"{source} is {damage}; expected {EXPECTED_FILE}") from err
        raise ValueError(f"{source} could not be read as weights ({type(err).__name__}: {err}); expected "
                         f"{EXPECTED_FILE}") from err
    return unwrap_state_dict(checkpoint, use_ema=use_ema, source=source)


_ZIP_MAGIC = b"PK\x03\x04"  # a zip archive's first local header: torch.save's format since PyTorch 1.6
_CUT = "an interrupted copy or download?"


def damaged_weights(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with a weights file, read from its structure alone (its header, its end), as a phrase for
    ``f"{path} is {phrase}"``: ``.safetensors`` shorter than its header says (truncated) or without a safetensors
    header (not a safetensors file); a zip archive (``torch.save``'s format) without its closing directory
    (truncated). None when nothing of the kind is found (the file may still fail to load for another reason).

    Raises:
        OSError: the file cannot be read.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        head = file.read(8)
        if path.endswith(".safetensors"):
            return _safetensors_damage(file, head, size)
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        return (f"truncated: a zip archive (torch.save's format) of {size} bytes without its closing directory "
                f"({_CUT})")
    return None


def _safetensors_damage(file: Any, head: bytes, size: int) -> str | None:
    """The safetensors layout: an 8-byte little-endian header length N, N bytes of JSON header naming each tensor's
    ``data_offsets`` [begin, end) in the data that follows."""
    if size == 0:
        return "empty (0 bytes)"
    if len(head) < 8:
        return f"truncated: {size} bytes, less than a safetensors file's 8-byte header length ({_CUT})"
    length = int.from_bytes(head, "little")
    if file.read(1) != b"{":
        return "not a safetensors file: no JSON header follows its first 8 bytes"
    if 8 + length > size:
        return (f"truncated: {size} bytes, but its header alone takes {8 + length} (safetensors layout; "
                f"{_CUT})")
    file.seek(8)
    try:
        header = json.loads(file.read(length))
    except ValueError:
        return "not a safetensors file: its header is not JSON"
    if not isinstance(header, dict):
        return "not a safetensors file: its header is not a JSON object"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"
            and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"truncated: {size} of the {expected} bytes its safetensors header describes ({_CUT})"
    return None


def resize_rpb(rpb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubically resizes an RPB table ``[heads, 2k-1, 2k-1]`` (how the official 11x11 file was made from 7x7)."""
    if rpb.dim() != 3:
        raise ValueError(f"resize_rpb: rpb must be [heads, 2k-1, 2k-1], got shape {tuple(rpb.shape)}")
    if tuple(rpb.shape[1:]) == tuple(size):
        return rpb
    return F.interpolate(rpb[None].float(), size=size, mode="bicubic", align_corners=False)[0].to(rpb.dtype)


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_weights` did.

    Attributes:
        source: The file (or ``"state dict"``).
        missing_keys: Model keys the file lacked that were allowed to keep their initialisation.
        unexpected_keys: File keys that were allowed and ignored.
        head: ``"loaded"``, ``"reinitialised"`` (the file's did not fit), ``"resized"`` (took the file's class
            count), ``"not_loaded"`` (the model has no classifier), ``"initialised"`` (the file has none) or
            ``"none"`` (no classifier on either side).
    """

    source: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    head: str = "none"


def _listed(keys: Sequence[str]) -> str:
    more = f" ... ({len(keys) - _LISTED_KEYS} more)" if len(keys) > _LISTED_KEYS else ""
    return f"{list(keys[:_LISTED_KEYS])}{more}"


def _mismatch_error(source: str, model: nn.Module, missing: list[str], unexpected: list[str], shapes: list[str],
                    note: str | None) -> ValueError:
    return ValueError(
        f"{source} does not match {type(model).__name__}: {len(missing)} keys missing, {len(unexpected)} unexpected, "
        f"{len(shapes)} tensors have other shapes than the model\n" + (f"  {note}\n" if note else "")
        + f"  missing: {_listed(missing)}\n  unexpected: {_listed(unexpected)}\n  mis-shaped: {_listed(shapes)}"
    )


def _resize_rpb_tables(state: StateDict, target: Mapping[str, torch.Tensor]) -> None:
    for key, value in state.items():
        want = target.get(key)
        if key.endswith("attn.rpb") and want is not None and value.dim() == 3 and value.shape[0] == want.shape[0] \
                and value.shape[1:] != want.shape[1:]:
            # an rpb table is [heads, 2k-1, 2k-1]: two sides
            state[key] = resize_rpb(value, tuple(want.shape[1:]))  # type: ignore[arg-type]
            log.info("resized %s bicubically from %s to %s", key, tuple(value.shape), tuple(want.shape))


def _adapt_first_conv(model: nn.Module, state: StateDict, target: Mapping[str, torch.Tensor], source: str) -> None:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    key = f"{first}.weight"
    if not isinstance(first, str) or key not in state or key not in target:
        return
    have, want = state[key], target[key]
    same_filters = have.shape[:1] + have.shape[2:] == want.shape[:1] + want.shape[2:]
    if have.dim() == 4 and have.shape != want.shape and same_filters:
        from timm.models import adapt_input_conv

        state[key] = adapt_input_conv(int(want.shape[1]), have)
        log.info("%s: %s adapted from %d to %d input channels (timm's rule)", source, key, have.shape[1], want.shape[1])


def _classifier(model: nn.Module) -> str | None:
    if not callable(getattr(model, "get_classifier", None)):
        return None
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    return name if isinstance(name, str) else None


_HeadDecision = tuple[str, list[str], str | None, tuple[int, str] | None]


def _decide_head(model: nn.Module, state: StateDict, head: str, source: str) -> _HeadDecision:
    """Applies the head rule to `state` (and the model). Returns the report's head entry, the head keys the model
    may keep as initialised, for a rejected head a note for the error message, and what the load line says about the
    head (its log level and text; :func:`load_weights` says everything about one load in one line)."""
    name = _classifier(model)
    if name is None:
        return "none", [], None, None
    keys = [f"{name}.weight", f"{name}.bias"]
    target = model.state_dict()
    own = {k: tuple(target[k].shape) for k in keys if k in target}
    given = {k: tuple(state[k].shape) for k in keys if k in state}
    if not own and not given:
        return "none", [], None, None
    if not own:
        for k in given:
            del state[k]
        return "not_loaded", [], None, (logging.INFO, f"the model has no classifier (num_classes=0); the file's {name} "
                                        f"({given.get(keys[0], (0,))[0]} classes) is not loaded")
    if not given:
        if head == "strict":
            return "initialised", [], f"the file has no classifier {name!r}", None
        return "initialised", list(own), None, (logging.WARNING, f"the file has no classifier {name!r}: the model's "
                                                f"{own[keys[0]][0]}-class head keeps its random initialisation")
    if own == given:
        return "loaded", [], None, None
    file_classes, model_classes = given[keys[0]][0], own[keys[0]][0]
    if head == "strict":
        return "loaded", [], (f"classifier {keys[0]} has shape {given[keys[0]]} but the model expects {own[keys[0]]}: "
                              f"the file was trained for {file_classes} classes, the model has {model_classes} (only "
                              "fine-tuning replaces a classifier)"), None
    if head == "adopt":
        # nn.Module.__getattr__ types submodules and buffers as Tensor | Module
        model.reset_classifier(file_classes)  # type: ignore[operator]
        return "resized", [], None, (logging.INFO, f"classifier resized to the file's {file_classes} classes")
    for k in given:
        del state[k]
    return "reinitialised", list(own), None, (logging.WARNING, f"the file's classifier has {file_classes} classes, the "
                                              f"model was asked for {model_classes}: {name!r} re-initialised")


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, key) for p in patterns)


def load_weights(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    *,
    head: str = "auto",
    use_ema: bool = False,
    filter_fn: Callable[[StateDict, nn.Module], StateDict] | None = None,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    source: str | os.PathLike[str] | None = None,
) -> LoadReport:
    """Loads weights into `model`: the one function behind every loading route.

    In order: reads the file (weights-only) or takes the mapping, unwraps training containers, applies the family's
    key work (`filter_fn`, by default ``model.checkpoint_filter``: HF transformers layout -> official, index
    checks), resizes RPB tables to the model's kernel size (bicubic), adapts the first conv to the model's input
    channels (timm's rule), decides about the classifier by comparing its shape with the file's, then checks every
    other key and shape before anything is copied.

    Args:
        model: The target model.
        checkpoint: A weights file (see :func:`read_state_dict`) or a state dict.
        head: ``"auto"``: keep the file's classifier when its shape fits the model's, re-initialise it (a warning
            says so) when it does not; ``"strict"``: a classifier of another shape is an error (evaluation);
            ``"adopt"``: resize the model's classifier to the file's class count.
        use_ema: Prefer EMA weights when the file holds both.
        filter_fn: Key work of the model family; None uses ``model.checkpoint_filter`` when the model has one.
        allow_missing: Regular expressions (full match) of model keys the file may lack (kept as initialised).
        allow_unexpected: Regular expressions of file keys that are ignored.
        source: The file a state-dict `checkpoint` was read from, for messages.

    Returns:
        What was loaded, skipped and decided about the head.

    Raises:
        FileNotFoundError, ValueError: A missing or unreadable file (named with what was expected).
        ValueError: Missing, unexpected or mis-shaped keys, all listed in one message; nothing is copied then.
    """
    if head not in _HEAD_MODES:
        raise ValueError(f"load_weights: head must be one of {list(_HEAD_MODES)}, got {head!r}")
    if isinstance(checkpoint, Mapping):
        source = "state dict" if source is None else f"checkpoint {os.fspath(source)!r}"
        state = unwrap_state_dict(checkpoint, use_ema=use_ema, source=source)
    else:
        source = f"checkpoint {os.fspath(checkpoint)!r}"
        state = read_state_dict(checkpoint, use_ema=use_ema)
    filter_fn = filter_fn if filter_fn is not None else getattr(model, "checkpoint_filter", None)
    if filter_fn is not None:
        state = dict(filter_fn(state, model))
    target = model.state_dict()
    _resize_rpb_tables(state, target)
    _adapt_first_conv(model, state, target, source)
    head_result, head_keys, note, said = _decide_head(model, state, head, source)
    target = model.state_dict()  # the head may have been resized
    missing = [k for k in target if k not in state and k not in head_keys]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in target.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    bad_missing = [k for k in missing if not _matches(k, allow_missing)]
    bad_unexpected = [k for k in unexpected if not _matches(k, allow_unexpected)]
    if bad_missing or bad_unexpected or shapes:
        raise _mismatch_error(source, model, bad_missing, bad_unexpected, shapes, note)
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    report = LoadReport(source, missing, unexpected, head_result)
    log.log(said[0] if said is not None else logging.INFO, "loaded %s into %s (head: %s%s%s%s)", source,
            type(model).__name__, head_result, f"; {said[1]}" if said is not None else "",
            f"; kept as initialised: {missing}" if missing else "", f"; ignored: {unexpected}" if unexpected else "")
    return report


def load_state_dict_overlay(state_dict: Mapping[str, Any], model: nn.Module) -> StateDict:
    """timm's ``pretrained_filter_fn`` of every family, reached only by ``pretrained_cfg_overlay=dict(state_dict=
    ...)`` (files go through ``model.load_pretrained``): loads through :func:`load_weights` and hands timm the
    model's own tensors back, so timm's own copy changes nothing."""
    # nn.Module.__getattr__ types submodules and buffers as Tensor | Module
    model.load_pretrained(state_dict)  # type: ignore[operator]
    return model.state_dict()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_NAMED_WEIGHTS = ("file", "state_dict", "hf_hub_id", "url")
# The weights file of a hub repository or a timm folder, in timm's order of preference.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_PROBE_TIMEOUT_S = 10.0


def _fix_hint(filename: str, cached: str | None = None) -> str:
    where = f", or place it at {cached} (torch.hub's cache)" if cached else ""
    return (f"Download the file by other means and pass pretrained_cfg_overlay=dict(file='/path/to/{filename}') to "
            f"timm.create_model (official .pth or HF pytorch_model.bin/model.safetensors both work){where}.")


def _download_url(urls: Sequence[str], name: str) -> str:
    """The first of `urls` found in torch.hub's cache, else the first that downloads there."""
    hub_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    paths = [os.path.join(hub_dir, os.path.basename(urlparse(url).path)) for url in urls]
    for path in paths:
        if os.path.isfile(path):
            return path
    errors = []
    for url, path in zip(urls, paths):
        try:
            os.makedirs(hub_dir, exist_ok=True)
            log.info("%s: downloading %s to %s", name, url, path)
            torch.hub.download_url_to_file(url, path, progress=False)
            return path
        except OSError as err:  # URLError, HTTPError and socket errors are all OSErrors
            errors.append(f"{url}: {type(err).__name__}: {err}")
    raise RuntimeError(f"{name}: could not download the pretrained weights from {urls[0]} ({'; '.join(errors)}). "
                       + _fix_hint(os.path.basename(paths[0]), paths[0]))


def _download_hf(hub_id: str, name: str) -> str:
    """The weights file of an HF Hub repo (``model.safetensors``, else ``pytorch_model.bin``), from the local cache
    or downloaded. Without a connection this fails at once (one request) instead of retrying for tens of seconds."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from huggingface_hub.utils import get_session

    repo_id, _, revision = hub_id.partition("@")
    source = f"hf_hub_id={hub_id!r}"
    for filename in WEIGHT_FILES:
        try:
            return hf_hub_download(repo_id, filename, revision=revision or None, local_files_only=True)
        except FileNotFoundError:  # not in the local cache
            continue
        except ValueError as err:  # an invalid repo id
            raise ValueError(f"{name}: {source} is not a valid Hugging Face repo id ({err})") from err
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(f"{name}: {source} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
                           + _fix_hint("pytorch_model.bin"))
    try:
        get_session().head(constants.ENDPOINT, timeout=_PROBE_TIMEOUT_S)
    except Exception as err:  # any failure to reach the Hub means offline for this purpose
        raise RuntimeError(f"{name}: cannot reach {constants.ENDPOINT} to download {source} ({type(err).__name__}: "
                           f"{err}). " + _fix_hint("pytorch_model.bin")) from err
    for filename in WEIGHT_FILES:
        try:
            return hf_hub_download(repo_id, filename, revision=revision or None)
        except RemoteEntryNotFoundError:
            continue
        except Exception as err:  # reported with the source and the way around it
            raise RuntimeError(f"{name}: could not download {filename} of {source} ({type(err).__name__}: {err}). "
                               + _fix_hint(filename)) from err
    raise RuntimeError(f"{name}: {source} has neither {' nor '.join(WEIGHT_FILES)}. " + _fix_hint("pytorch_model.bin"))


def local_weights(
    variant: str, pretrained: bool, kwargs: Mapping[str, Any], alternate_urls: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """timm builder arguments whose ``pretrained_cfg_overlay`` names a local weights file.

    A URL (tried with `alternate_urls` of the tag after a failure) or HF Hub source is fetched first, so timm only
    ever hands a local file (or a ``state_dict`` overlay) to the model. A SHA-256 recorded in
    :data:`CHECKPOINT_SHA256` for the tag is checked.

    Args:
        variant: Registry name.
        pretrained: Whether weights are to be loaded.
        kwargs: ``timm.create_model`` keyword arguments (``pretrained_cfg``, ``pretrained_cfg_overlay``, model args).
        alternate_urls: ``{'variant.tag': [url, ...]}`` to try when the cfg's URL fails.

    Raises:
        ValueError: Weights are named in the overlay but `pretrained` is false (they would be silently ignored), or
            the file's SHA-256 differs from the recorded one.
        RuntimeError: A remote source cannot be fetched (the message names it and the way around it).
    """
    from timm.models import resolve_pretrained_cfg

    kwargs = dict(kwargs)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if not pretrained:
        named = [k for k in _NAMED_WEIGHTS if overlay.get(k) is not None]
        if named:
            raise ValueError(f"{variant}: pretrained_cfg_overlay names weights ({', '.join(named)}) but "
                             "pretrained=False, so they would not be loaded; pass pretrained=True")
        return dict(kwargs, pretrained_cfg_overlay=overlay) if overlay else kwargs
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=overlay).to_dict()
    name = f"{variant}.{cfg['tag']}" if cfg.get("tag") else variant
    if cfg.get("state_dict") is not None:
        return dict(kwargs, pretrained_cfg_overlay=overlay)
    if cfg.get("file"):
        path = os.fspath(cfg["file"])
        if os.path.isdir(path):  # timm's local-dir source: the folder's weights file is read by timm
            check_folder_weights(path)
    elif cfg.get("hf_hub_id"):
        path = _download_hf(cfg["hf_hub_id"], name)
    elif cfg.get("url"):
        path = _download_url([cfg["url"], *(alternate_urls or {}).get(name, [])], name)
    else:
        raise RuntimeError(f"{name} has no pretrained weights source; pass pretrained_cfg_overlay=dict(file=...)")
    expected = CHECKPOINT_SHA256.get(name)
    if expected is not None and os.path.isfile(path) and sha256_file(path) != expected:
        raise ValueError(f"{name}: file={path!r} does not have the recorded SHA-256 {expected}")
    # timm resets custom_load for an overlay source unless it is given: the file is still for load_pretrained.
    return dict(kwargs, pretrained_cfg_overlay=dict(overlay, file=path, custom_load=True))


def check_folder_weights(folder: str | os.PathLike[str]) -> None:
    """A timm folder's weights file (``model.safetensors``, else ``pytorch_model.bin``: timm's preference) that is
    truncated or of another kind is named before timm reads it (its reader's error names no file).

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    for name in WEIGHT_FILES:
        file = os.path.join(folder, name)
        if os.path.isfile(file):
            damage = damaged_weights(file)
            if damage is not None:
                raise ValueError(f"{file} is {damage}; the timm folder {folder} cannot be loaded")
            return


def pretrained_file(name: str, pretrained_cfg_overlay: Mapping[str, Any] | None = None) -> str:
    """The local file of a model's published weights (timm's pretrained cfg of ``name``, with a ``.tag`` or without):
    from the cache, downloaded, or the file an overlay names (``pretrained_cfg_overlay=dict(file=...)``), checked
    against a recorded SHA-256 (:func:`local_weights`). Load it with :func:`load_weights`.

    Raises:
        RuntimeError: the source cannot be fetched, or the overlay gives a state dict rather than a file.
        ValueError: the file's SHA-256 differs from the recorded one.
    """
    args = local_weights(name, True, {"pretrained_cfg_overlay": dict(pretrained_cfg_overlay or {})})
    file = (args.get("pretrained_cfg_overlay") or {}).get("file")
    if not file:
        raise RuntimeError(f"{name}: the pretrained weights are not a file; pass pretrained_cfg_overlay=dict(file=...)")
    return os.fspath(file)
