"""Deterministic demo dataset: classes of shapes and textures written as PNG files in ImageNet's folder layout.

The images are drawn with PIL from a seeded generator, so a given set of parameters always yields byte-identical
files. Each class has a random foreground/background colour pair, position, scale, rotation and additive noise, so
the task needs more than colour statistics but stays learnable by a tiny model in a few minutes on a CPU.

Layout (the same as ImageNet's, so the demo goes through the ImageFolder code path used for ImageNet)::

    <root>/train/<class>/<index>.png
    <root>/val/<class>/<index>.png
    <root>/MANIFEST.json        written last; its presence (with matching parameters) marks the dataset complete
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["DEMO_CLASSES", "MANIFEST_NAME", "generate_demo_dataset", "ensure_demo_dataset"]

DEMO_CLASSES = ("circle", "square", "triangle", "cross", "ring", "stripes", "checker", "dots")
MANIFEST_NAME = "MANIFEST.json"
_FORMAT_VERSION = 2
_SUPERSAMPLE = 4


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A dark background and a light foreground colour of random hues (the foreground is always the lighter one)."""
    bg = rng.integers(0, 100, size=3)
    fg = rng.integers(140, 256, size=3)
    return tuple(int(c) for c in bg), tuple(int(c) for c in fg)


def _rotate(points: np.ndarray, angle: float, centre: np.ndarray) -> list[tuple[float, float]]:
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return [tuple(p) for p in (points - centre) @ rot.T + centre]


def _draw_sample(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class ``cls`` at ``size`` x ``size`` px."""
    big = size * _SUPERSAMPLE
    bg, fg = _colours(rng)
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    scale = rng.uniform(0.55, 0.9) * big
    half = scale / 2
    centre = rng.uniform(half, big - half, size=2)
    cx, cy = centre
    angle = rng.uniform(0, 2 * math.pi)
    width = max(2, int(scale * rng.uniform(0.12, 0.22)))
    if cls == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fg)
    elif cls == "ring":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], outline=fg, width=width)
    elif cls == "square":
        pts = np.array([[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half], [cx - half, cy + half]])
        draw.polygon(_rotate(pts * 0.8 + centre * 0.2, angle, centre), fill=fg)
    elif cls == "triangle":
        corners = (0.0, 2 * math.pi / 3, 4 * math.pi / 3)
        pts = np.array([[cx + half * math.cos(a), cy + half * math.sin(a)] for a in corners])
        draw.polygon(_rotate(pts, angle, centre), fill=fg)
    elif cls == "cross":
        for a in (angle, angle + math.pi / 2):
            end = np.array([math.cos(a), math.sin(a)]) * half
            draw.line([tuple(centre - end), tuple(centre + end)], fill=fg, width=width)
    elif cls == "stripes":
        period = rng.uniform(0.12, 0.3) * big
        normal = np.array([math.cos(angle), math.sin(angle)])
        yy, xx = np.mgrid[0:big, 0:big]
        phase = (xx * normal[0] + yy * normal[1]) / period + rng.uniform(0, 1)
        mask = (phase % 1.0) < 0.5
        img = Image.fromarray(np.where(mask[..., None], np.array(fg), np.array(bg)).astype(np.uint8))
    elif cls == "checker":
        period = rng.uniform(0.25, 0.45) * big
        yy, xx = np.mgrid[0:big, 0:big]
        u = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        v = (-xx * math.sin(angle) + yy * math.cos(angle)) / period
        mask = (np.floor(u) + np.floor(v)) % 2 == 0
        img = Image.fromarray(np.where(mask[..., None], np.array(fg), np.array(bg)).astype(np.uint8))
    elif cls == "dots":
        radius = rng.uniform(0.035, 0.06) * big
        for _ in range(int(rng.integers(6, 12))):
            x, y = rng.uniform(radius, big - radius, size=2)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fg)
    else:
        raise ValueError(f"unknown demo class {cls!r}")
    small = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    noise = rng.normal(0.0, rng.uniform(2.0, 10.0), size=small.shape)
    return Image.fromarray(np.clip(small + noise, 0, 255).astype(np.uint8))


def _params(train_per_class: int, val_per_class: int, img_size: int, seed: int) -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "classes": list(DEMO_CLASSES),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "img_size": int(img_size),
        "seed": int(seed),
    }


def generate_demo_dataset(
    root: Union[str, Path], train_per_class: int = 300, val_per_class: int = 50, img_size: int = 32, seed: int = 0
) -> Path:
    """Writes the demo dataset to ``root`` (which must not exist) and returns ``root``.

    The files are written into a temporary sibling directory that is renamed to ``root`` once complete, with the
    manifest written last, so an interrupted generation never leaves a dataset that looks complete.

    Args:
        root: destination directory.
        train_per_class: training images per class.
        val_per_class: validation images per class.
        img_size: image side in pixels.
        seed: base seed; split ``s`` of class ``c`` uses its own generator derived from (seed, s, c).
    """
    for name, value, low in (("train_per_class", train_per_class, 1), ("val_per_class", val_per_class, 1),
                             ("img_size", img_size, 8)):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    params = _params(train_per_class, val_per_class, img_size, seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        counts = {}
        for split_idx, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
            for cls_idx, cls in enumerate(DEMO_CLASSES):
                rng = np.random.default_rng([seed, split_idx, cls_idx])
                out = tmp / split / cls
                out.mkdir(parents=True)
                for i in range(count):
                    _draw_sample(cls, img_size, rng).save(out / f"{i:05d}.png", optimize=False)
            counts[split] = count * len(DEMO_CLASSES)
        manifest = dict(params, counts=counts)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def ensure_demo_dataset(
    root: Union[str, Path], train_per_class: int = 300, val_per_class: int = 50, img_size: int = 32, seed: int = 0
) -> Path:
    """Returns ``root`` holding the demo dataset for these parameters, generating it only when absent.

    A complete dataset (manifest present with the same parameters) is reused as is. A complete dataset generated
    with other parameters is replaced. A directory without a manifest is not ours (or an unfinished copy from an
    older version) and is left alone: a ``ValueError`` asks the user to remove it or pick another ``data.root``.
    """
    root = Path(root)
    wanted = _params(train_per_class, val_per_class, img_size, seed)
    if root.exists():
        manifest = _read_manifest(root)
        if manifest is None:
            if any(root.iterdir()):
                raise ValueError(
                    f"data.root={str(root)!r} exists but holds no {MANIFEST_NAME}, so it is not a complete demo "
                    "dataset;"
                    " delete it (it will be regenerated) or point data.root elsewhere"
                )
            root.rmdir()
        elif {k: manifest.get(k) for k in wanted} == wanted:
            return root
        else:
            stale = root.with_name(f".{root.name}.stale-{os.getpid()}")
            os.replace(root, stale)
            shutil.rmtree(stale, ignore_errors=True)
    try:
        return generate_demo_dataset(root, train_per_class, val_per_class, img_size, seed)
    except OSError:
        # Another process (e.g. another rank of a multi-node job) finished first: use its copy if it matches.
        manifest = _read_manifest(root)
        if manifest is not None and {k: manifest.get(k) for k in wanted} == wanted:
            return root
        raise
