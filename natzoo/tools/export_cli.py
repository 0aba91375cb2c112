"""``natzoo-export`` / ``python -m natzoo.tools.export``: a run's checkpoint, a timm folder or a registered model to an
ONNX file, a ``torch.export`` program (``.pt2``) or a timm folder, checked against PyTorch (docs/export.md).

The written file carries the model's :class:`~natzoo.tools.model_info.ModelInfo` (preprocessing and class names) and
a mark saying natzoo-export wrote it: an existing output is replaced only with ``--overwrite`` and only when it holds
that mark. Files are written in a scratch folder next to the output, checked, then moved into place, so a failed or
interrupted export leaves the previous output as it was.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from natzoo.ownership import scratch_prefix
from natzoo.tools.model_info import RECORD_KEY, ModelInfo
from natzoo.tools.sources import (
    WRITER,
    WRITER_KEY,
    LoadedModel,
    load_model,
    onnx_written_by_natzoo,
    program_written_by_natzoo,
    source_kind,
)

__all__ = ["FORMATS", "export", "main"]

FORMATS = {".onnx": "onnx", ".pt2": "program"}  # any other output path: a timm folder
_CHECK_BATCH = 2


def _format_of(output: Path, given: str | None) -> str:
    if given is not None:
        return given
    return FORMATS.get(output.suffix.lower(), "timm")


def _check_output(output: Path, fmt: str, overwrite: bool) -> None:
    """Before any work: the output's folder exists and is writable; an existing output is replaced only with
    ``overwrite`` and only when natzoo-export wrote it."""
    if fmt in ("onnx", "program") and output.suffix.lower() != {"onnx": ".onnx", "program": ".pt2"}[fmt]:
        raise ValueError(f"--output {str(output)!r}: a {fmt} is written to a "
                         f"{ {'onnx': '.onnx', 'program': '.pt2'}[fmt]} file")
    if not output.parent.is_dir():
        raise ValueError(f"--output {str(output)!r}: folder {str(output.parent)!r} does not exist")
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {str(output)!r}: folder {str(output.parent)!r} is not writable")
    if not (output.exists() or output.is_symlink()):
        return
    if fmt == "timm" and output.is_dir() and not any(output.iterdir()):
        return  # an empty folder
    if not overwrite:
        raise ValueError(f"--output {str(output)!r} exists; choose another path, or pass --overwrite to replace an "
                         "output natzoo-export wrote")
    if fmt == "timm":
        from natzoo.tools.timm_export import written_by_natzoo

        ours = written_by_natzoo(output)
    elif output.is_symlink() or not output.is_file():
        ours = False
    else:
        ours = onnx_written_by_natzoo(output) if fmt == "onnx" else program_written_by_natzoo(output)
    if not ours:
        raise ValueError(f"--output {str(output)!r} exists and was not written by natzoo-export (it carries no "
                         "natzoo mark); it is not replaced even with --overwrite: choose another path")


def _dynamic_kwargs(function: Any, dynamic: bool) -> dict[str, Any]:
    """``dynamic=True`` for the export function when asked, if this natzoo's export functions take it."""
    if not dynamic:
        return {}
    if "dynamic" not in inspect.signature(function).parameters:
        raise ValueError(f"--dynamic: natzoo.tools.export.{function.__name__} has no dynamic= option in this natzoo "
                         "(dynamic-resolution export is not available); export at a fixed size with --img-size")
    return {"dynamic": True}


def _check_input(info: ModelInfo) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(_CHECK_BATCH, *info.input_size, generator=generator)


def _max_difference(got: Any, expected: torch.Tensor) -> float:
    return float((torch.as_tensor(got).float() - expected.float()).abs().max())


def _write_onnx(loaded: LoadedModel, info: ModelInfo, scratch: Path, name: str, dynamic: bool,
                opset: int | None) -> tuple[Path, float, str]:
    import onnx

    from natzoo.tools.export import export_onnx

    path = scratch / name
    export_onnx(loaded.model, path, info.input_size, opset_version=opset, **_dynamic_kwargs(export_onnx, dynamic))
    proto = onnx.load(os.fspath(path), load_external_data=False)  # tensors in a .data file stay there
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        RECORD_KEY: info.to_json(), WRITER_KEY: WRITER})
    onnx.save(proto, os.fspath(path))
    x = _check_input(info)
    with torch.no_grad():
        expected = loaded.model(x)
    try:
        import onnxruntime as ort
    except ImportError:
        onnx.checker.check_model(os.fspath(path))
        return path, float("nan"), "checked by onnx.checker only (ONNX Runtime is not installed)"
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return path, _max_difference(got, expected), f"ONNX Runtime vs PyTorch, batch {_CHECK_BATCH}"


def _write_program(loaded: LoadedModel, info: ModelInfo, scratch: Path, name: str,
                   dynamic: bool) -> tuple[Path, float, str]:
    from natzoo.tools.export import export_program

    program = export_program(loaded.model, info.input_size, **_dynamic_kwargs(export_program, dynamic))
    path = scratch / name
    torch.export.save(program, path, extra_files={"natzoo_model.json": info.to_json(), WRITER_KEY: WRITER})
    x = _check_input(info)
    with torch.no_grad():
        expected = loaded.model(x)
        got = torch.export.load(path).module()(x)
    return path, _max_difference(got, expected), f"the saved program reloaded vs eager PyTorch, batch {_CHECK_BATCH}"


def export(source: str, output: str | os.PathLike, fmt: str | None = None, *, use_ema: bool = False,
           pretrained: bool = False, random_weights: bool = False, img_size: Sequence[int] | None = None,
           dynamic: bool = False, overwrite: bool = False, opset: int | None = None, atol: float = 1e-3,
           report: Any = print) -> tuple[Path, float]:
    """Exports ``source`` to ``output`` and checks the written model against the PyTorch model.

    Args:
        source: a ``.ckpt``, a timm folder or a registered name (:func:`natzoo.tools.sources.source_kind`).
        output: the file (``.onnx``, ``.pt2``) or folder (timm layout) to write.
        fmt: ``onnx``, ``program`` or ``timm``; None: from ``output``'s suffix.
        use_ema: a checkpoint's EMA weights.
        pretrained: a registered name's published weights.
        random_weights: a registered name with random weights.
        img_size: ``(height, width)`` to export at; None: the recorded input size.
        dynamic: dynamic height and width (natzoo.tools.export's ``dynamic=`` option).
        overwrite: replace an existing output that natzoo-export wrote.
        opset: ONNX opset (None: the exporter's default).
        atol: largest accepted absolute difference of the logits.
        report: where progress lines go.

    Returns:
        The written path and the largest absolute difference found.

    Raises:
        ValueError: a bad source, output or option (before any export work), or a written model that differs from
            PyTorch by more than ``atol`` (it is then not moved into place).
    """
    out = Path(output)
    if fmt is not None and fmt not in ("onnx", "program", "timm"):
        raise ValueError(f"--format must be onnx, program or timm, got {fmt!r}")
    fmt = _format_of(out, fmt)
    if dynamic and fmt == "timm":
        raise ValueError("--dynamic applies to ONNX and torch.export outputs, not to a timm folder")
    if img_size is not None and (len(img_size) not in (1, 2) or not all(isinstance(v, int) and v > 0
                                                                          for v in img_size)):
        raise ValueError(f"--img-size takes one or two positive integers (height [width]), got {img_size!r}")
    _check_output(out, fmt, overwrite)
    if dynamic:
        from natzoo.tools import export as export_module

        _dynamic_kwargs(export_module.export_onnx if fmt == "onnx" else export_module.export_program, dynamic)
    source_kind(source, "source")
    loaded = load_model(source, use_ema=use_ema, pretrained=pretrained, random_weights=random_weights,
                        argument="source")
    info = loaded.info
    if info.assumed:
        report(f"note: {info.assumed}")
    if img_size is not None:
        info = info.with_input_size(img_size[0], img_size[-1])
    report(f"model: {info.describe()}")
    if fmt == "timm":
        return _export_timm(loaded, info, out, atol, report)
    sweep_dir = out.parent
    scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix(out.name, "partial"), dir=sweep_dir))
    try:
        if fmt == "onnx":
            written, difference, how = _write_onnx(loaded, info, scratch, out.name, dynamic, opset)
        else:
            written, difference, how = _write_program(loaded, info, scratch, out.name, dynamic)
        if not difference <= atol and difference == difference:  # NaN: no runtime to compare with
            raise ValueError(f"the exported {fmt} differs from PyTorch by {difference:.3g} (> --atol {atol}); "
                             f"nothing was written to {out}")
        items = sorted(scratch.iterdir(), key=lambda p: p.name == out.name)  # the model file last
        for item in items:
            # A file beside the model (ONNX external data) may replace only its own earlier version.
            if item.name != out.name and (out.parent / item.name).exists() and not out.exists():
                raise ValueError(f"{out.parent / item.name} exists and was not written with {out} by natzoo-export; "
                                 "it is not replaced: choose another output name")
        for item in items:
            os.replace(item, out.parent / item.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(f"wrote {out} ({fmt}, input {info.input_size[1]}x{info.input_size[2]}{', dynamic H/W' if dynamic else ''})")
    report(f"check: max |difference| {difference:.3g} ({how})")
    return out, difference


def _export_timm(loaded: LoadedModel, info: ModelInfo, out: Path, atol: float, report: Any) -> tuple[Path, float]:
    from natzoo.tools.timm_export import read_timm_folder, save_timm_model

    # Only a registered model's published weights keep the architecture's official labels.
    if loaded.kind == "name":
        origin = None if loaded.pretrained else "Random weights (natzoo-export --random-weights)"
    elif loaded.trained:
        origin = f"Trained with natzoo: {loaded.source}"
    else:
        origin = None  # a timm folder from elsewhere keeps what its config says
    save_timm_model(loaded.model, out, dict(info.data_config), info.label_names, trained_from=origin,
                    model_kwargs=info.model_kwargs)
    rebuilt, _ = read_timm_folder(out)
    x = _check_input(info)
    with torch.no_grad():
        difference = _max_difference(rebuilt(x), loaded.model(x))
    if difference > atol:
        raise ValueError(f"the timm folder {out} rebuilds a model that differs by {difference:.3g} (> --atol {atol})")
    report(f"wrote {out} (timm folder: timm.create_model('local-dir:{out}', pretrained=True) after import "
           "natzoo.models)")
    report(f"check: max |difference| {difference:.3g} (the folder rebuilt by timm vs the source model, batch "
           f"{_CHECK_BATCH})")
    return out, difference


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``natzoo-export``."""
    parser = argparse.ArgumentParser(
        prog="natzoo-export", description="Export a natzoo classifier (a run's .ckpt, a timm folder or a registered "
        "model name) to ONNX (.onnx), a torch.export program (.pt2) or a timm folder, with its preprocessing and "
        "class names, and check the written model against PyTorch.")
    parser.add_argument("source", help="a Lightning checkpoint (.ckpt), a timm folder or a registered model name")
    parser.add_argument("-o", "--output", required=True,
                        help="file to write: .onnx (ONNX), .pt2 (torch.export program); any other path: a timm folder")
    parser.add_argument("--format", choices=("onnx", "program", "timm"), default=None,
                        help="output format (default: from the output's suffix)")
    parser.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights (default: raw)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="a model name with its published weights")
    weights.add_argument("--random-weights", action="store_true",
                         help="a model name with random weights (pipeline tests only)")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="SIZE", default=None,
                        help="export at HEIGHT [WIDTH] (default: the size the model was evaluated at)")
    parser.add_argument("--dynamic", action="store_true",
                        help="dynamic height and width (ONNX / torch.export; see docs/export.md)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest accepted |difference| of the logits")
    parser.add_argument("--overwrite", action="store_true", help="replace an output natzoo-export wrote before")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``natzoo-export`` and ``python -m natzoo.tools.export``; exits 2 with one line on a bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        export(args.source, args.output, args.format, use_ema=args.ema, pretrained=args.pretrained,
               random_weights=args.random_weights, img_size=args.img_size, dynamic=args.dynamic,
               overwrite=args.overwrite, opset=args.opset, atol=args.atol)
    except ValueError as err:
        parser.exit(2, f"natzoo-export: error: {err}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
