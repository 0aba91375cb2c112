"""Export for deployment: ``torch.export`` programs and ONNX files with a dynamic batch axis (docs/export.md).

Both go through the pure-PyTorch reference path of the neighborhood-attention op (forced for the duration of the
export, whatever the device), so the exported graph holds only standard operators: gathers, matrix products, a
masked softmax. The resolution is static: the reference builds its window index tables for one input size and the
graph stores them as constants. The batch axis is dynamic.

ONNX files are written by PyTorch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``) from the
``torch.export`` program; the TorchScript-based exporter records the batch size of its example input in every
reshape of the attention and is not used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from natzoo.ops.neighborhood import use_backend

__all__ = ["export_onnx", "export_program", "native_input_size"]

# Above this many bytes of weights and constants, ONNX needs the external-data format (protobuf's 2 GiB limit).
_EXTERNAL_DATA_BYTES = 1_800_000_000


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


def _program_example(program: torch.export.ExportedProgram) -> tuple[torch.Tensor, bool]:
    """An input for ``program`` (batch 2) and whether its batch axis is dynamic."""
    names = program.graph_signature.user_inputs
    if len(names) != 1:
        raise ValueError(f"the exported program takes {len(names)} inputs; export_onnx handles one image tensor")
    spec = next(node.meta["val"] for node in program.graph.nodes if node.op == "placeholder" and node.name == names[0])
    dynamic = not isinstance(spec.shape[0], int)
    return torch.zeros(2 if dynamic else spec.shape[0], *(int(d) for d in spec.shape[1:]), dtype=spec.dtype), dynamic


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
                   dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` program of ``model``'s inference forward at one resolution.

    The model is traced in eval mode (its own mode is restored afterwards) on the reference NA path, with an example
    batch of 2 (a batch of 1 would be specialised). Run it with ``program.module()(images)``; save and load it with
    ``torch.export.save`` / ``torch.export.load``.

    Args:
        model: An image model taking one NCHW tensor (a natzoo/timm classifier, :class:`natzoo.detection.NATBackbone`).
        input_size: ``(channels, height, width)``; None takes the model's native size (:func:`native_input_size`).
        dynamic_batch: Make the batch axis dynamic (any batch size >= 1); False fixes it at 2.

    Returns:
        The exported program.
    """
    example = _example(model, input_size)
    dynamic = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with _exporting(model):
        return torch.export.export(model, (example,), dynamic_shapes=dynamic)


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
                output_names: Sequence[str] | None = None, opset_version: int | None = None) -> Path:
    """Writes ``model`` as an ONNX file through :func:`export_program` and PyTorch's dynamo-based ONNX exporter.

    Args:
        model: As for :func:`export_program`, or a program it returned (then ``input_size`` and ``dynamic_batch``
            are the program's and must be left at their defaults).
        path: Destination ``.onnx`` file; its folder must exist. Models whose weights and constants exceed about
            1.8 GB are written in ONNX's external-data format (a ``<path>.data`` file beside it).
        input_size: ``(channels, height, width)``; None takes the model's native size.
        dynamic_batch: Name the batch axis ``batch`` and leave it free; False fixes it at 2.
        input_name: Name of the graph input.
        output_names: Names of the graph outputs; default ``logits`` for a classifier with a head, else ``output``
            (``output0``, ``output1``, ... for several outputs, e.g. a backbone's stage maps).
        opset_version: ONNX opset; None takes the exporter's default.

    Returns:
        ``path``.
    """
    path = _check_output_path(path)
    if output_names is not None and (isinstance(output_names, str) or not all(isinstance(n, str) for n in
                                                                               output_names)):
        raise TypeError(f"output_names must be a sequence of str, got {output_names!r}")
    if isinstance(model, torch.export.ExportedProgram):
        if input_size is not None or not dynamic_batch:
            raise ValueError("input_size and dynamic_batch are fixed by the exported program; leave them unset")
        program = model
        example, dynamic_batch = _program_example(program)
    else:
        program = export_program(model, input_size, dynamic_batch=dynamic_batch)
        example = _example(model, input_size)
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
    torch.onnx.export(program, (example,), path, dynamo=True, input_names=[input_name], output_names=list(output_names),
                      opset_version=opset_version, dynamic_shapes=({0: "batch"},) if dynamic_batch else None,
                      external_data=size > _EXTERNAL_DATA_BYTES, verbose=False)
    return path
