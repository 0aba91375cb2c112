"""Checkpoint helpers shared by the NAT-family model files.

Loading a file never unpickles arbitrary objects (``torch.load(..., weights_only=True)`` or safetensors). The HF
transformers ports (``nat.``/``dinat.`` prefixes, split q/k/v, stacked ``layer_scale_parameters``) are converted
to the official layout (spec section 3.1) so one checkpoint filter serves both formats.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

__all__ = [
    "load_checkpoint_file",
    "unwrap_state_dict",
    "is_hf_state_dict",
    "convert_hf_state_dict",
    "check_state_dict",
    "resize_rpb",
    "filter_checkpoint",
    "build_with_weights",
    "CHECKPOINT_SHA256",
    "sha256_file",
]

StateDict = Dict[str, torch.Tensor]

# SHA-256 of the official files, keyed 'variant.tag'. The DiNAT-Large files were replaced on 2023-01-17 and their
# outputs depend on the version held (spec 1.3), so record the hash of the file you validated here; a file given
# through pretrained_cfg_overlay=dict(file=...) is then checked against it. None means not recorded (unknown).
CHECKPOINT_SHA256: Dict[str, Optional[str]] = {
    "dinat_large.in22k_ft_in1k": None,
    "dinat_large.in22k": None,
    "dinat_large_384.in22k_ft_in1k": None,
    "dinat_large_384_11x11.in22k_ft_in1k": None,
    "dinat_large_11x11.in22k": None,
}

_WRAPPER_KEYS = ("model", "state_dict")
_EMA_KEYS = ("state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")
_HF_PREFIXES = ("nat.", "dinat.")


def unwrap_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = False) -> StateDict:
    """Returns the flat name -> tensor dict inside a checkpoint.

    Args:
        checkpoint: A flat state dict or a training checkpoint holding one under ``model``, ``state_dict`` or
            ``state_dict_ema``/``model_ema``.
        use_ema: Prefer the EMA weights when the checkpoint holds them. Without it the EMA weights are used only
            when nothing else is there.

    Returns:
        The state dict with ``module.`` / ``_orig_mod.`` prefixes stripped (and a ``model.`` prefix shared by every
        key, as written by a LightningModule holding the network as ``self.model``).
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"unwrap_state_dict: checkpoint must be a mapping, got {type(checkpoint).__name__}")
    obj: Any = checkpoint
    for _ in range(3):
        if not isinstance(obj, Mapping) or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        order = _EMA_KEYS + _WRAPPER_KEYS if use_ema else _WRAPPER_KEYS + _EMA_KEYS
        inner = next((obj[k] for k in order if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"unwrap_state_dict: no tensors found; top-level keys are {sorted(checkpoint)[:10]} (expected a flat "
            "state dict or one under 'model', 'state_dict' or 'state_dict_ema')"
        )
    for prefix in _PREFIXES:
        tensors = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in tensors.items()}
    if all(k.startswith("model.") for k in tensors):
        tensors = {k[len("model.") :]: v for k, v in tensors.items()}
    return tensors


def load_checkpoint_file(path: "str | os.PathLike[str]", use_ema: bool = False) -> StateDict:
    """Reads a checkpoint file (``.pth``/``.bin``/``.ckpt`` via weights-only torch.load, or ``.safetensors``).

    Args:
        path: The file.
        use_ema: See :func:`unwrap_state_dict`.

    Returns:
        The flat state dict on CPU, in whatever layout the file has (official or HF, see
        :func:`convert_hf_state_dict`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint_file: path={path!r} is not a file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        checkpoint = load_file(path, device="cpu")
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return unwrap_state_dict(checkpoint, use_ema=use_ema)


def is_hf_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for the HF transformers layout (classifier or backbone) of NAT/DiNAT weights."""
    return any(
        k.startswith(_HF_PREFIXES + ("embeddings.", "encoder.levels.", "hidden_states_norms.")) for k in state_dict
    )


_HF_LAYER_NAMES = (
    ("layernorm_before.", "norm1."),
    ("attention.self.rpb", "attn.rpb"),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_HF_LAYER = re.compile(r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^attention\.self\.(query|key|value)\.(weight|bias)$")


def convert_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Converts HF transformers NAT/DiNAT weights to the official key layout (spec section 3.1).

    Handles the classifier models (``nat.``/``dinat.`` prefix, ``classifier.*`` head) and the backbones (no prefix,
    ``hidden_states_norms.stage{k}`` -> ``norm{k-1}``, as the official detection backbone names them). Keys it does
    not know are passed through unchanged so that a strict load reports them.

    Args:
        state_dict: HF-layout state dict.

    Returns:
        The same tensors under official names, with ``attn.qkv`` concatenated from query/key/value and
        ``gamma1``/``gamma2`` split from ``layer_scale_parameters``.
    """
    out: StateDict = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        key = name
        for prefix in _HF_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        layer = _HF_LAYER.match(key)
        if layer is not None:
            block, rest = f"levels.{layer.group(1)}.blocks.{layer.group(2)}.", layer.group(3)
            part = _HF_QKV.match(rest)
            if part is not None:
                qkv.setdefault(f"{block}attn.qkv.{part.group(2)}", {})[part.group(1)] = tensor
                continue
            if rest == "layer_scale_parameters":
                out[f"{block}gamma1"], out[f"{block}gamma2"] = tensor[0].clone(), tensor[1].clone()
                continue
            for hf, official in _HF_LAYER_NAMES:
                if rest.startswith(hf):
                    rest = official + rest[len(hf) :]
                    break
            out[block + rest] = tensor
            continue
        norm = re.match(r"^hidden_states_norms\.stage(\d+)\.(.+)$", key)
        if key.startswith("embeddings.patch_embeddings.projection."):
            key = "patch_embed.proj." + key[len("embeddings.patch_embeddings.projection.") :]
        elif key.startswith("embeddings.norm."):
            key = "patch_embed.norm." + key[len("embeddings.norm.") :]
        elif key.startswith("encoder.levels."):
            key = "levels." + key[len("encoder.levels.") :]
        elif key.startswith("layernorm."):
            key = "norm." + key[len("layernorm.") :]
        elif key.startswith("classifier."):
            key = "head." + key[len("classifier.") :]
        elif norm is not None:
            key = f"norm{int(norm.group(1)) - 1}.{norm.group(2)}"
        out[key] = tensor
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"convert_hf_state_dict: {key} needs query, key and value; found only {sorted(parts)}")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def resize_rpb(rpb: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bicubically resizes an RPB table ``[heads, 2k-1, 2k-1]`` (how the official 11x11 file was made from 7x7)."""
    if rpb.dim() != 3:
        raise ValueError(f"resize_rpb: rpb must be [heads, 2k-1, 2k-1], got shape {tuple(rpb.shape)}")
    if tuple(rpb.shape[1:]) == tuple(size):
        return rpb
    dtype = rpb.dtype
    return F.interpolate(rpb[None].float(), size=size, mode="bicubic", align_corners=False)[0].to(dtype)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], skip: Iterable[str] = ()) -> None:
    """Raises a ValueError listing every missing, unexpected and mis-shaped key, before anything is copied.

    Args:
        model: The target model.
        state_dict: The (converted) checkpoint.
        skip: Key names not to check (the classifier when timm is about to drop it for a new class count).
    """
    skip = set(skip)
    expected = {k: v for k, v in model.state_dict().items() if k not in skip}
    given = {k: v for k, v in state_dict.items() if k not in skip}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        name = type(model).__name__
        raise ValueError(
            f"checkpoint does not match {name} ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(shapes)} mis-shaped keys)\n  missing: {missing}\n  unexpected: {unexpected}\n"
            f"  mis-shaped: {shapes}"
        )


def filter_checkpoint(state_dict: Mapping[str, Any], model: nn.Module) -> StateDict:
    """The checkpoint filter of every family: official or HF layout in, validated official layout out.

    * unwraps training checkpoints and converts the HF layout (:func:`convert_hf_state_dict`);
    * resizes ``attn.rpb`` tables bicubically when the model's kernel size differs (7x7 -> 11x11);
    * for ``in22k`` weights loaded with the default class count, resizes the model's head to the checkpoint's
      (the ImageNet-22K class count is read from the file, spec 2.4);
    * raises a ValueError naming every missing, unexpected and mis-shaped key. The classifier is exempt when the
      model's class count differs from the pretrained config's, because timm then drops it (and loads
      non-strictly).

    Args:
        state_dict: What timm read from the file, URL or ``state_dict`` overlay.
        model: The freshly built target model.
    """
    sd = unwrap_state_dict(state_dict)
    if is_hf_state_dict(sd):
        sd = convert_hf_state_dict(sd)
    target = model.state_dict()
    for key, value in list(sd.items()):
        if key.endswith("attn.rpb") and key in target:
            want = target[key].shape
            if value.dim() == 3 and value.shape[0] == want[0] and value.shape[1:] != want[1:]:
                sd[key] = resize_rpb(value, tuple(want[1:]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or "head"
    head_w = sd.get(f"{classifier}.weight")
    num_classes = getattr(model, "num_classes", None)
    if (
        head_w is not None
        and str(cfg.get("tag", "")).endswith("in22k")
        and num_classes == cfg.get("num_classes")
        and head_w.shape[0] != num_classes
        and hasattr(model, "reset_classifier")
    ):
        model.reset_classifier(int(head_w.shape[0]))
    skip = set()
    if num_classes is not None and num_classes != cfg.get("num_classes", num_classes):
        skip = {f"{classifier}.weight", f"{classifier}.bias"}
    check_state_dict(model, sd, skip=skip)
    return sd


def sha256_file(path: "str | os.PathLike[str]") -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _full_tag(variant: str, kwargs: Mapping[str, Any]) -> Tuple[str, Any]:
    from timm.models import get_pretrained_cfg

    tag = kwargs.get("pretrained_cfg")
    tag = tag if isinstance(tag, str) else None
    cfg = get_pretrained_cfg(f"{variant}.{tag}" if tag else variant)
    return (f"{variant}.{cfg.tag}" if cfg is not None and cfg.tag else variant), cfg


def _is_download_error(err: BaseException) -> bool:
    if isinstance(err, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return True
    module = type(err).__module__ or ""
    return module.startswith(("huggingface_hub", "requests", "httpx", "urllib3"))


def build_with_weights(
    build: Callable[..., nn.Module],
    variant: str,
    pretrained: bool,
    alternate_urls: Optional[Mapping[str, List[str]]] = None,
    **kwargs: Any,
) -> nn.Module:
    """Calls ``build(variant, pretrained, **kwargs)`` and turns a failed download into an actionable error.

    A failed download of a file with known alternate names (spec 2.4, DiNAT_s) is retried with each of them.

    Args:
        build: The family's ``build_model_with_cfg`` wrapper.
        variant: Registry name.
        pretrained: Load weights.
        alternate_urls: ``{'variant.tag': [url, ...]}`` to retry on a failed download.
        **kwargs: Model and timm builder arguments.
    """
    file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    if pretrained and file:
        full, _ = _full_tag(variant, kwargs)
        expected = CHECKPOINT_SHA256.get(full)
        if expected is not None and os.path.isfile(file) and sha256_file(file) != expected:
            raise ValueError(f"{full}: file={file!r} does not have the recorded SHA-256 {expected}")
    try:
        return build(variant, pretrained, **kwargs)
    except Exception as err:  # noqa: BLE001 - only download failures are rewritten, everything else re-raised
        if not pretrained or not _is_download_error(err):
            raise
        full, cfg = _full_tag(variant, kwargs)
        for url in (alternate_urls or {}).get(full, []):
            overlay = dict(kwargs.get("pretrained_cfg_overlay") or {}, url=url)
            try:
                return build(variant, pretrained, **dict(kwargs, pretrained_cfg_overlay=overlay))
            except Exception as retry_err:  # noqa: BLE001
                if not _is_download_error(retry_err):
                    raise
        url = cfg.url if cfg is not None else None
        filename = os.path.basename(url) if url else "<checkpoint>.pth"
        hub_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise RuntimeError(
            f"{full}: could not download the pretrained weights from {url} ({type(err).__name__}: {err}). "
            f"Download the file by other means and either pass "
            f"pretrained_cfg_overlay=dict(file='/path/to/{filename}') to timm.create_model (official .pth or HF "
            f"pytorch_model.bin/model.safetensors both work), or place it at {os.path.join(hub_dir, filename)} "
            f"(torch.hub's cache)."
        ) from err


def pretrained_cfg(url: str, first_conv: str, **kwargs: Any) -> Dict[str, Any]:
    """timm pretrained cfg fields shared by every family (spec 2.5); `kwargs` add or override fields."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": "head",
        "license": "mit",
        "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
        **kwargs,
    }
