"""``natzoo-predict`` / ``python -m natzoo.tools.predict``: classify images with a run's checkpoint, a timm folder,
an ONNX file or a registered model (docs/export.md).

Each image goes through the model's own evaluation preprocessing (the :class:`~natzoo.tools.model_info.ModelInfo`
its file records; timm's ``create_transform``), in batches. The top-k classes with their names and probabilities go to
the console and, with ``--output``, to a CSV or JSON file (written atomically, never over an existing file). An image
that cannot be read stops the command with its name, or with ``--skip-bad`` is listed as skipped (in the file too,
with the reason): no image ever gets a label it was not given by the model.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from natzoo.ownership import scratch_prefix
from natzoo.tools.model_info import ModelInfo
from natzoo.tools.sources import OnnxClassifier, load_model, source_kind

__all__ = ["Prediction", "collect_images", "main", "predict"]

# PIL's errors for files that are not images, truncated or too large (a decompression bomb).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_PROGRESS_FROM = 64  # images; shorter inputs print no progress bar


@dataclass
class Prediction:
    """One image's result: its top-k ``(class index, class name, probability)``, or the reason it was skipped."""

    path: str
    top: list[tuple[int, str, float]] = field(default_factory=list)
    error: str | None = None


def _images_in(folder: Path) -> list[str]:
    found = [os.path.join(root, name) for root, dirs, names in os.walk(folder)
             for name in names if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")]
    return sorted(found)


def collect_images(inputs: Sequence[str]) -> list[str]:
    """The image files that ``inputs`` name: files as given, folders searched recursively for image extensions,
    glob patterns (``**`` recursive) expanded; in order, each file once.

    Raises:
        ValueError: an input that does not exist, a folder without images, a pattern that matches nothing.
    """
    if not inputs:
        raise ValueError("no images given: pass image files, folders or glob patterns")
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = _images_in(path)
            if not found:
                raise ValueError(f"folder {item!r} holds no image files (extensions {', '.join(IMG_EXTENSIONS)})")
            files.extend(found)
        elif path.exists():
            if not path.is_file():
                raise ValueError(f"{item!r} is not a regular file")
            files.append(item)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            found = [f for m in matches for f in (_images_in(Path(m)) if os.path.isdir(m) else [m])]
            if not found:
                raise ValueError(f"pattern {item!r} matches no file")
            files.extend(found)
        else:
            raise ValueError(f"image {item!r} does not exist")
    return list(dict.fromkeys(files))


def _open_error(path: str) -> str | None:
    """Why ``path`` is not an image PIL can open (its header only), or None."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018  (the header is parsed on open; size proves it was)
    except _IMAGE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


class _Images(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[str], transform: Callable):
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            with Image.open(self.files[index]) as image:
                return index, self.transform(image.convert("RGB")), None
        except _IMAGE_ERRORS as err:
            return index, None, f"{type(err).__name__}: {err}"


def _collate(batch: list[tuple[int, torch.Tensor | None, str | None]]) -> list[tuple[int, torch.Tensor | None,
                                                                                     str | None]]:
    return batch


def _load(model: str, use_ema: bool, pretrained: bool, device: str) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                              ModelInfo]:
    kind = source_kind(model, "--model")
    if kind == "name" and not pretrained:
        raise ValueError(f"--model {model!r} is a registered model name: pass --pretrained for its published weights "
                         "(random weights would give meaningless labels)")
    if kind == "onnx":
        if use_ema or pretrained:
            raise ValueError(f"--ema / --pretrained choose PyTorch weights; {model!r} is an ONNX file with its own")
        classifier = OnnxClassifier(model, device)
        return classifier, classifier.info
    loaded = load_model(model, use_ema=use_ema, pretrained=pretrained, argument="--model")
    network = loaded.model.to(device)

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return network(images.to(device))

    return run, loaded.info


def predict(model: str, inputs: Sequence[str], *, top_k: int = 5, batch_size: int = 32, skip_bad: bool = False,
            use_ema: bool = False, pretrained: bool = False, device: str = "cpu", workers: int = 0,
            progress: bool | None = None, report: Callable[[str], None] = print) -> tuple[list[Prediction], ModelInfo]:
    """Classifies the images ``inputs`` name (:func:`collect_images`) with ``model``.

    Args:
        model: a ``.ckpt``, a timm folder, an ``.onnx`` file or a registered name (with ``pretrained``).
        inputs: image files, folders and glob patterns.
        top_k: classes per image (at most the model's class count).
        batch_size: images per forward.
        skip_bad: skip images that cannot be read (listed with the reason) instead of stopping.
        use_ema: a checkpoint's EMA weights.
        pretrained: a registered name's published weights.
        device: torch device for PyTorch models (``cuda`` also picks ONNX Runtime's CUDA provider when present).
        workers: data-loader worker processes decoding the images.
        progress: a progress bar (on stderr); None: for inputs of 64 images or more.
        report: where notes go.

    Returns:
        One :class:`Prediction` per image, in input order, and the model's description.

    Raises:
        ValueError: a bad model, input or option, or (without ``skip_bad``) an image that cannot be read, naming it.
    """
    for name, value, low in (("--top-k", top_k, 1), ("--batch-size", batch_size, 1), ("--workers", workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    files = collect_images(inputs)
    errors = {path: why for path in files if (why := _open_error(path)) is not None}
    if errors and not skip_bad:
        path, why = next(iter(errors.items()))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValueError(f"cannot read image {path}: {why}{more}; fix or remove it, or pass --skip-bad to skip "
                         "unreadable images")
    run, info = _load(model, use_ema, pretrained, device)
    if info.assumed:
        report(f"note: {info.assumed}")
    k = min(top_k, info.num_classes)
    labels = info.labels
    results = [Prediction(path, error=errors.get(path)) for path in files]
    readable = [i for i, path in enumerate(files) if path not in errors]
    loader = torch.utils.data.DataLoader(_Images([files[i] for i in readable], info.transform()),
                                         batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    show = len(readable) >= _PROGRESS_FROM if progress is None else progress
    bar = None
    if show:
        # tqdm ships no type information (no py.typed marker)
        from tqdm import tqdm  # type: ignore[import-untyped]

        bar = tqdm(total=len(readable), unit="img", file=sys.stderr, desc="natzoo-predict")
    for batch in loader:
        decoded = []
        for index, image, why in batch:
            result = results[readable[index]]
            if image is None:
                if not skip_bad:
                    raise ValueError(f"cannot read image {result.path}: {why}; fix or remove it, or pass --skip-bad "
                                     "to skip unreadable images")
                result.error = why
            else:
                decoded.append((result, image))
        if decoded:
            logits = run(torch.stack([image for _, image in decoded])).float().cpu()
            if logits.ndim != 2 or logits.shape[1] != info.num_classes:
                raise ValueError(f"{model}: the model returned {tuple(logits.shape)}, expected [batch, "
                                 f"{info.num_classes}] logits")
            probabilities, indices = logits.softmax(dim=1).topk(k, dim=1)
            for (result, _), p, i in zip(decoded, probabilities.tolist(), indices.tolist(), strict=True):
                result.top = [(c, labels[c], q) for c, q in zip(i, p, strict=True)]
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results, info


def _console_lines(results: Sequence[Prediction]) -> Iterator[str]:
    for result in results:
        if result.error is not None:
            yield f"{result.path}: skipped ({result.error})"
        else:
            yield f"{result.path}: " + ", ".join(f"{name} {100 * p:.1f}%" for _, name, p in result.top)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix(path.name, "tmp"), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_output(output: str | None) -> Path | None:
    if output is None:
        return None
    path = Path(output)
    if path.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--output {output!r}: give a .csv or .json file")
    if path.exists() or path.is_symlink():
        raise ValueError(f"--output {output!r} exists; it is not replaced: choose another file")
    if not path.parent.is_dir():
        raise ValueError(f"--output {output!r}: folder {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {output!r}: folder {str(path.parent)!r} is not writable")
    return path


def write_results(path: Path, results: Sequence[Prediction], info: ModelInfo, model: str) -> None:
    """The results as CSV (one row per image: ``path``, ``label_i``, ``probability_i``, ``index_i`` for i = 1..k,
    ``error``) or JSON (the model, its preprocessing and one entry per image), by ``path``'s suffix."""
    k = max((len(r.top) for r in results), default=0)
    if path.suffix.lower() == ".json":
        document = {
            "model": model, "model_description": info.describe(), "preprocessing": info.to_record()["data_config"],
            "top_k": k,
            "predictions": [{"path": r.path, "error": r.error} if r.error is not None else
                            {"path": r.path, "top": [{"index": c, "label": n, "probability": p} for c, n, p in r.top]}
                            for r in results],
        }
        _write_atomic(path, json.dumps(document, indent=1) + "\n")
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", *[f"{f}_{i}" for i in range(1, k + 1) for f in ("label", "probability", "index")],
                     "error"])
    for r in results:
        cells: list[Any] = [v for c, n, p in r.top for v in (n, f"{p:.6f}", c)]
        writer.writerow([r.path, *cells, *[""] * (3 * k - len(cells)), r.error or ""])
    _write_atomic(path, buffer.getvalue())


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``natzoo-predict``."""
    parser = argparse.ArgumentParser(
        prog="natzoo-predict", description="Classify images with a natzoo run's checkpoint, a timm folder, an ONNX "
        "file or a registered model, with the model's own preprocessing; top-k class names to the console and to a "
        "CSV/JSON file.")
    parser.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("-m", "--model", required=True,
                        help="a run's .ckpt, a timm folder, an .onnx file or a registered model name "
                        "(with --pretrained)")
    parser.add_argument("-k", "--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("-o", "--output", default=None, help="also write the results to this new .csv or .json file")
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="images per forward (default 32)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip images that cannot be read (named, and listed in the output) instead of stopping")
    parser.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights (default: raw)")
    parser.add_argument("--pretrained", action="store_true", help="a model name with its published weights")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", action="store_true", default=None, help="always show a progress bar")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-image lines on the console")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``natzoo-predict`` and ``python -m natzoo.tools.predict``; exits 2 with one line on a bad
    input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        output = _check_output(args.output)
        results, info = predict(args.model, args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                                skip_bad=args.skip_bad, use_ema=args.ema, pretrained=args.pretrained, device=device,
                                workers=args.workers, progress=args.progress,
                                report=lambda line: print(line, file=sys.stderr))
    except ValueError as err:
        parser.exit(2, f"natzoo-predict: error: {err}\n")
    if not args.quiet:
        try:
            for line in _console_lines(results):
                print(line)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader stopped early (`| head`): the rest of the run still writes its file
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    skipped = [r for r in results if r.error is not None]
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s): {', '.join(r.path for r in skipped[:5])}"
              f"{', ...' if len(skipped) > 5 else ''}", file=sys.stderr)
    if output is not None:
        write_results(output, results, info, args.model)
        k = min(args.top_k, info.num_classes)
        print(f"wrote {output} ({len(results) - len(skipped)} images classified, top-{k}"
              f"{f', {len(skipped)} skipped' if skipped else ''})", file=sys.stderr)


if __name__ == "__main__":
    main()
