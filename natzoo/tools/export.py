"""Export for deployment: ``torch.export`` programs and ONNX files with a dynamic batch axis (docs/export.md).

Both go through the pure-PyTorch reference path of the neighborhood-attention op (forced for the duration of the
export, whatever the device), so the exported graph holds only standard operators: gathers, matrix products, a
masked softmax. By default the resolution is static: the reference builds its window index tables for one input
size and the graph stores them as constants. With ``dynamic=True`` the height and width are symbolic within the
range :func:`dynamic_size_range` declares, and the graph computes the tables from them. The batch axis is dynamic.

ONNX files are written by PyTorch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``) from the
``torch.export`` program; the TorchScript-based exporter records the batch size of its example input in every
reshape of the attention and is not used.

The command line (``natzoo-export``, ``python -m natzoo.tools.export``) is :mod:`natzoo.tools.export_cli`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from natzoo.ops.neighborhood import use_backend

if TYPE_CHECKING:
    from natzoo.models import NAT

__all__ = ["check_onnx_input_size", "dynamic_size_range", "export_detector_onnx", "export_onnx", "export_program",
           "main", "native_input_size", "onnx_size_range"]

# Above this many bytes of weights and constants, ONNX needs the external-data format (protobuf's 2 GiB limit).
_EXTERNAL_DATA_BYTES = 1_800_000_000
# The dynamic range reaches this many times the export size (the native one by default).
_DYNAMIC_MAX_FACTOR = 4
# ONNX metadata_props keys holding a dynamic file's declared range, "min-max" in pixels.
RANGE_KEYS = ("natzoo.height_range", "natzoo.width_range")


def native_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` the model was built for: its timm pretrained cfg's ``input_size``.

    Raises:
        ValueError: If the model has no pretrained cfg with an ``input_size`` (pass ``input_size`` explicitly then).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    if size is None:
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg['input_size']; pass input_size=(3, H, W)")
    return _check_input_size(size)


def _check_input_size(input_size: object) -> tuple[int, int, int]:
    if not isinstance(input_size, (tuple, list)) or len(input_size) != 3:
        raise TypeError(f"input_size must be (channels, height, width), got {input_size!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in input_size):
        raise ValueError(f"input_size must hold three positive ints, got {input_size!r}")
    return tuple(input_size)


def _example(model: nn.Module, input_size: Sequence[int] | None, batch: int = 2) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    size = native_input_size(model) if input_size is None else _check_input_size(input_size)
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    return torch.zeros(batch, *size, device=device, dtype=dtype)  # values do not matter; the RNG stays untouched


def _program_example(program: torch.export.ExportedProgram) -> tuple[torch.Tensor, bool, bool]:
    """An input for ``program`` (batch 2, the traced height and width) and whether its batch axis and its height
    and width are dynamic."""
    names = program.graph_signature.user_inputs
    if len(names) != 1:
        raise ValueError(f"the exported program takes {len(names)} inputs; export_onnx handles one image tensor")
    spec = next(node.meta["val"] for node in program.graph.nodes if node.op == "placeholder" and node.name == names[0])
    dynamic = not isinstance(spec.shape[0], int)
    # A symbolic side takes its traced value (a loaded program may lack it: then the lower end of its range).
    spatial = [d if isinstance(d, int) else int(d.node.hint if d.node.hint is not None
                                                 else program.range_constraints[d.node.expr].lower)
               for d in spec.shape[1:]]
    dynamic_size = any(not isinstance(d, int) for d in spec.shape[2:])
    return torch.zeros(2 if dynamic else spec.shape[0], *spatial, dtype=spec.dtype), dynamic, dynamic_size


def _nat_trunk(model: nn.Module) -> tuple[NAT, int | None]:
    """The NAT-family trunk whose blocks decide the dynamic range, and how many of its stages run (None: all)."""
    from natzoo.detection.backbone import NATBackbone
    from natzoo.models import NAT

    if isinstance(model, NATBackbone):
        return model.trunk, max(model.out_indices) + 1
    if isinstance(model, NAT):
        return model, None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size"):
        raise ValueError(f"{type(model).__name__} has a fixed input size {tuple(cfg.get('input_size', ()))[1:]} "
                         "(pretrained_cfg['fixed_input_size']); export it with dynamic=False")
    raise ValueError(f"dynamic=True: {type(model).__name__} is not a hierarchical NAT-family model (NAT, DiNAT, "
                     "DiNAT_s) or a natzoo.detection.NATBackbone, so it has no declared dynamic range; export it "
                     "with dynamic=False")


def dynamic_size_range(model: nn.Module, input_size: Sequence[int] | None = None) -> tuple[tuple[int, int], ...]:
    """``((min_height, max_height), (min_width, max_width))`` a ``dynamic=True`` export of `model` accepts.

    The lower end is the smallest size at which no block pads its map or clamps its dilation
    (:meth:`natzoo.models.NAT.min_unpadded_input_size`; for a detection backbone, of the stages it runs); the upper
    end is 4 times the export size (`input_size`, or the native size when None).

    Raises:
        ValueError: The model has no dynamic range (an isotropic model, fixed at 224 px, or not a NAT family), or
            the export size lies below the lower end.
    """
    trunk, num_stages = _nat_trunk(model)
    size = native_input_size(model) if input_size is None else _check_input_size(input_size)
    lower = trunk.min_unpadded_input_size(num_stages)
    ranges = tuple((low, _DYNAMIC_MAX_FACTOR * side) for low, side in zip(lower, size[1:]))
    for axis, side, (low, _high) in zip(("height", "width"), size[1:], ranges):
        if side < low:
            raise ValueError(f"dynamic=True: input_size {axis} {side} is below {low}, the smallest {axis} at which "
                             f"no block of {type(model).__name__} pads its map; export at a size >= {low}")
    return ranges


def _dynamic_example(model: nn.Module, input_size: Sequence[int] | None,
                     ranges: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The export example for a dynamic height and width: the export size, with the width moved off the height
    when they are equal (equal example sizes would let the tracer tie the two symbols together)."""
    example = _example(model, input_size)
    height, width = example.shape[2:]
    if height == width:
        (_, _), (low, high) = ranges
        width = width + 1 if width + 1 <= high else width - 1
        if width < low:
            raise ValueError(f"dynamic=True: the width range {low}..{high} is a single size")
        example = example.new_zeros(*example.shape[:3], width)
    return example


@contextlib.contextmanager
def _exporting(model: nn.Module) -> Iterator[None]:
    """Eval mode and the reference NA backend for the duration of an export; the model's mode is restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with use_backend("reference"):
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def export_program(model: nn.Module, input_size: Sequence[int] | None = None, *,
                   dynamic_batch: bool = True, dynamic: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` program of ``model``'s inference forward at one resolution, or at any height and width in
    a declared range.

    The model is traced in eval mode (its own mode is restored afterwards) on the reference NA path, with an example
    batch of 2 (a batch of 1 would be specialised). Run it with ``program.module()(images)``; save and load it with
    ``torch.export.save`` / ``torch.export.load``.

    Args:
        model: An image model taking one NCHW tensor (a natzoo/timm classifier, :class:`natzoo.detection.NATBackbone`).
        input_size: ``(channels, height, width)``; None takes the model's native size (:func:`native_input_size`).
        dynamic_batch: Make the batch axis dynamic (any batch size >= 1); False fixes it at 2.
        dynamic: Make the height and width dynamic (``torch.export.Dim`` ``height`` and ``width``) within
            :func:`dynamic_size_range`; the program then rejects a size outside it, naming the bound. The window
            tables are computed in the graph and each query gathers its own window (the cost: docs/export.md).

    Returns:
        The exported program.

    Raises:
        ValueError: ``dynamic=True`` for a model without a dynamic range, or an `input_size` outside it.
    """
    if not isinstance(dynamic, bool):
        raise TypeError(f"dynamic must be a bool, got {dynamic!r}")
    if not dynamic:
        example = _example(model, input_size)
        shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        with _exporting(model):
            return torch.export.export(model, (example,), dynamic_shapes=shapes)
    ranges = dynamic_size_range(model, input_size)
    example = _dynamic_example(model, input_size, ranges)
    (h_min, h_max), (w_min, w_max) = ranges
    axes = {2: torch.export.Dim("height", min=h_min, max=h_max), 3: torch.export.Dim("width", min=w_min, max=w_max)}
    if dynamic_batch:
        axes[0] = torch.export.Dim("batch", min=1)
    with _exporting(model):
        return torch.export.export(model, (example,), dynamic_shapes=(axes,))


def _check_output_path(path: str | os.PathLike) -> Path:
    """The destination, checked before any export work: its folder exists and is writable, and the path is not a
    folder (nor a file that cannot be replaced)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path={str(path)!r} is a folder; give the .onnx file to write, e.g. {str(path / 'model.onnx')!r}")
    if not path.parent.is_dir():
        raise ValueError(f"path={str(path)!r}: folder {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"path={str(path)!r}: folder {str(path.parent)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"path={str(path)!r} exists and is not writable")
    return path


def export_onnx(model: nn.Module | torch.export.ExportedProgram, path: str | os.PathLike,
                input_size: Sequence[int] | None = None, *, dynamic_batch: bool = True, input_name: str = "input",
                output_names: Sequence[str] | None = None, opset_version: int | None = None,
                dynamic: bool = False) -> Path:
    """Writes ``model`` as an ONNX file through :func:`export_program` and PyTorch's dynamo-based ONNX exporter.

    Args:
        model: As for :func:`export_program`, or a program it returned (then ``input_size``, ``dynamic_batch`` and
            ``dynamic`` are the program's and must be left at their defaults).
        path: Destination ``.onnx`` file; its folder must exist. Models whose weights and constants exceed about
            1.8 GB are written in ONNX's external-data format (a ``<path>.data`` file beside it).
        input_size: ``(channels, height, width)``; None takes the model's native size.
        dynamic_batch: Name the batch axis ``batch`` and leave it free; False fixes it at 2.
        input_name: Name of the graph input.
        output_names: Names of the graph outputs; default ``logits`` for a classifier with a head, else ``output``
            (``output0``, ``output1``, ... for several outputs, e.g. a backbone's stage maps).
        opset_version: ONNX opset; None takes the exporter's default.
        dynamic: Name the height and width axes ``height`` and ``width`` and leave them free within
            :func:`dynamic_size_range`, which the file records in its metadata (``natzoo.height_range``,
            ``natzoo.width_range``; :func:`onnx_size_range` reads them, :func:`check_onnx_input_size` checks a size).
            onnxruntime does not check the range itself: below it the gathers fail, above it nothing is checked.

    Returns:
        ``path``.
    """
    path = _check_output_path(path)
    if output_names is not None and (isinstance(output_names, str) or not all(isinstance(n, str) for n in
                                                                               output_names)):
        raise TypeError(f"output_names must be a sequence of str, got {output_names!r}")
    if isinstance(model, torch.export.ExportedProgram):
        if input_size is not None or not dynamic_batch or dynamic:
            raise ValueError("input_size, dynamic_batch and dynamic are fixed by the exported program; leave them "
                             "unset")
        program = model
        example, dynamic_batch, dynamic = _program_example(program)
    else:
        program = export_program(model, input_size, dynamic_batch=dynamic_batch, dynamic=dynamic)
        example = _program_example(program)[0] if dynamic else _example(model, input_size)
    outputs = len(program.graph_signature.user_outputs)
    if output_names is None:
        if outputs == 1:
            output_names = ["logits" if getattr(model, "num_classes", 0) else "output"]
        else:
            output_names = [f"output{i}" for i in range(outputs)]
    elif len(output_names) != outputs:
        raise ValueError(f"output_names has {len(output_names)} names, but the model returns {outputs} tensors")
    size = sum(t.numel() * t.element_size() for t in (*program.state_dict.values(), *program.constants.values())
               if isinstance(t, torch.Tensor))
    axes = {0: "batch"} if dynamic_batch else {}
    if dynamic:
        axes.update({2: "height", 3: "width"})
    torch.onnx.export(program, (example,), path, dynamo=True, input_names=[input_name], output_names=list(output_names),
                      opset_version=opset_version, dynamic_shapes=(axes,) if axes else None,
                      external_data=size > _EXTERNAL_DATA_BYTES, verbose=False)
    if dynamic:
        _record_range(path, _program_ranges(program))
    return path


def _program_ranges(program: torch.export.ExportedProgram) -> tuple[tuple[int, int], ...]:
    """The declared ``(min, max)`` of the program's input height and width (its range constraints)."""
    name = program.graph_signature.user_inputs[0]
    spec = next(node.meta["val"] for node in program.graph.nodes if node.op == "placeholder" and node.name == name)
    ranges = []
    for side in spec.shape[2:]:
        bounds = program.range_constraints[side.node.expr]
        ranges.append((int(bounds.lower), int(bounds.upper)))
    return tuple(ranges)


def _record_range(path: Path, ranges: tuple[tuple[int, int], ...]) -> None:
    """Writes the dynamic range into the ONNX file's metadata_props (rewriting the file in place, same data)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for key, (low, high) in zip(RANGE_KEYS, ranges):
        entry = next((p for p in proto.metadata_props if p.key == key), None) or proto.metadata_props.add()
        entry.key, entry.value = key, f"{low}-{high}"
    onnx.save(proto, str(path))


def onnx_size_range(path: str | os.PathLike) -> tuple[tuple[int, int], ...] | None:
    """``((min_height, max_height), (min_width, max_width))`` recorded by ``export_onnx(..., dynamic=True)`` in
    the file at `path`, or None for a file without them (a static export, or not written by natzoo)."""
    import onnx

    return size_range_of({p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props})


def size_range_of(metadata: dict[str, str]) -> tuple[tuple[int, int], ...] | None:
    """:func:`onnx_size_range` from a file's metadata already read (e.g. an ONNX Runtime session's
    ``custom_metadata_map``), without loading the file again."""
    if not all(key in metadata for key in RANGE_KEYS):
        return None
    return tuple((int(metadata[key].split("-")[0]), int(metadata[key].split("-")[1])) for key in RANGE_KEYS)


def check_onnx_input_size(path: str | os.PathLike, height: int, width: int,
                          metadata: dict[str, str] | None = None) -> None:
    """Raises ValueError naming the size and the range when ``(height, width)`` lies outside the dynamic range of
    the ONNX file at `path` (see :func:`onnx_size_range`; from `metadata` when the caller has read it already);
    files without a recorded range are not checked here (onnxruntime checks static sizes itself)."""
    ranges = size_range_of(metadata) if metadata is not None else onnx_size_range(path)
    if ranges is None:
        return
    for axis, side, (low, high) in zip(("height", "width"), (height, width), ranges):
        if not low <= side <= high:
            raise ValueError(f"input {axis} {side} is outside the range {low}..{high} that {str(path)!r} was "
                             f"exported for (height {ranges[0][0]}..{ranges[0][1]}, width "
                             f"{ranges[1][0]}..{ranges[1][1]})")


def export_detector_onnx(detector: nn.Module, path: str | os.PathLike, image_size: Sequence[int],
                         opset_version: int = 17) -> Path:
    """Writes a torchvision Faster R-CNN / Mask R-CNN with a NAT-family backbone
    (:func:`natzoo.detection.build_detector`) as an ONNX file taking one ``[3, H, W]`` image and returning
    ``boxes [n, 4]``, ``labels [n]``, ``scores [n]`` (and ``masks`` for Mask R-CNN).

    This goes through PyTorch's TorchScript-based exporter, the one torchvision's detection models support: the
    dynamo-based exporter stops at torchvision's data-dependent branches on the number of boxes (docs/export.md,
    "Detection model"). That tracer records the backbone's window tables and reshapes for the one padded size the
    detector's transform gives `image_size` (resize, then pad to a multiple of 32): the file runs every image that
    the transform maps to that same padded size, and fails on others. The padded size is recorded in the file's
    metadata (``natzoo.detector_padded_size``, ``HxW``).

    Args:
        detector: The detector (eval mode is used for the export; its mode is restored after).
        path: Destination ``.onnx`` file; its folder must exist.
        image_size: ``(3, H, W)`` of the example image.
        opset_version: ONNX opset (torchvision's detection export needs >= 11).

    Returns:
        ``path``.
    """
    import onnx

    path = _check_output_path(path)
    size = _check_input_size(image_size)
    transform = getattr(detector, "transform", None)
    if transform is None or not hasattr(detector, "roi_heads"):
        raise TypeError(f"detector must be a torchvision Faster R-CNN / Mask R-CNN, got {type(detector).__name__}")
    image = torch.rand(*size, generator=torch.Generator().manual_seed(0))
    outputs = ["boxes", "labels", "scores"] + (["masks"] if getattr(detector.roi_heads, "has_mask", lambda: False)()
                                               else [])
    with _exporting(detector), torch.no_grad():
        padded = tuple(transform([image])[0].tensors.shape[2:])
        torch.onnx.export(detector, ([image],), str(path), dynamo=False, opset_version=opset_version,
                          input_names=["image"], output_names=outputs,
                          dynamic_axes={"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in outputs}})
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "natzoo.detector_padded_size", "x".join(map(str, padded))
    onnx.save(proto, str(path))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m natzoo.tools.export``: the ``natzoo-export`` command (:mod:`natzoo.tools.export_cli`)."""
    from natzoo.tools.export_cli import main as command

    command(argv)


if __name__ == "__main__":
    main()
