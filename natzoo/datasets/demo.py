"""Deterministic demo dataset: classes of shapes and textures written as PNG files in ImageNet's folder layout.

The images are drawn with PIL from a seeded generator, so a given set of parameters always yields byte-identical
files. Each class has a random foreground/background colour pair, position, scale, rotation and additive noise, so
the task needs more than colour statistics but stays learnable by a tiny model in a few minutes on a CPU.

Layout (the same as ImageNet's, so the demo goes through the ImageFolder code path used for ImageNet)::

    <root>/train/<class>/<index>.png
    <root>/val/<class>/<index>.png
    <root>/MANIFEST.json        written last: generator, parameters and every file with its size

Generation, reuse and replacement follow natzoo's one protocol of generated data (:class:`natzoo.ownership
.GeneratedFolder`, docs/reliability.md): a folder whose manifest it did not write, or which holds files its manifest
does not list, is never touched.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from natzoo.ownership import GeneratedFolder

__all__ = ["DEMO_CLASSES", "MANIFEST_NAME", "ensure_demo_dataset", "generate_demo_dataset"]

log = logging.getLogger(__name__)

DEMO_CLASSES = ("circle", "square", "triangle", "cross", "ring", "stripes", "checker", "dots")
MANIFEST_NAME = "MANIFEST.json"
_GENERATOR = "natzoo.datasets.demo"
_MANIFEST_VERSION = 3  # the generator, its parameters and every file with its size
_FORMAT_VERSION = 2  # version of the drawing code: images of equal parameters and format version are byte-identical
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
    for name, value, low in (("train_per_class", train_per_class, 1), ("val_per_class", val_per_class, 1),
                             ("img_size", img_size, 8)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return {
        "format_version": _FORMAT_VERSION,
        "classes": list(DEMO_CLASSES),
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "img_size": img_size,
        "seed": seed,
    }


# Every path the generator writes, relative to the dataset folder (folders with a trailing "/").
_WRITES = re.compile(rf"(?:train|val)/(?:(?:{'|'.join(DEMO_CLASSES)})/(?:\d{{5,}}\.png)?)?|{re.escape(MANIFEST_NAME)}")


_FOLDER = GeneratedFolder(_GENERATOR, MANIFEST_NAME, lambda rel: _WRITES.fullmatch(rel) is not None)


def _draw_all(out: Path, train_per_class: int, val_per_class: int, img_size: int, seed: int) -> None:
    for split_idx, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for cls_idx, cls in enumerate(DEMO_CLASSES):
            rng = np.random.default_rng([seed, split_idx, cls_idx])
            folder = out / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                _draw_sample(cls, img_size, rng).save(folder / f"{i:05d}.png", optimize=False)


def generate_demo_dataset(
    root: str | os.PathLike, train_per_class: int = 300, val_per_class: int = 50, img_size: int = 32, seed: int = 0
) -> Path:
    """Writes the demo dataset to ``root`` (which must not exist, or be an empty folder) and returns ``root``.

    The files are written into a temporary sibling folder (a scratch name of :mod:`natzoo.ownership`, so a later
    run can remove it if this process is killed) that is renamed to ``root`` once complete, with the manifest
    written last, so an interrupted generation never leaves a dataset that looks complete.

    Args:
        root: Destination folder.
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        img_size: Image side in pixels.
        seed: Base seed; split ``s`` of class ``c`` uses its own generator derived from (seed, s, c).

    Raises:
        ValueError: If a parameter is out of range.
        FileExistsError: If ``root`` exists and is not an empty folder.
    """
    params = _params(train_per_class, val_per_class, img_size, seed)
    root = Path(root)
    if root.is_symlink() or root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty folder; the demo dataset is written only to a new "
                              "or empty folder")
    counts = {"train": train_per_class * len(DEMO_CLASSES), "val": val_per_class * len(DEMO_CLASSES)}
    record = {"manifest_version": _MANIFEST_VERSION, **params, "counts": counts}
    return _FOLDER.generate(root, record, lambda out: _draw_all(out, train_per_class, val_per_class, img_size, seed))


def _not_ours(root: Path, why: str) -> ValueError:
    return ValueError(
        f"data.root={str(root)!r} {why}, so it is not a demo dataset natzoo generated; natzoo never writes into or "
        f"deletes such a folder. To train on your own images in it use data=folder data.root={str(root)!r}; for the "
        "demo, point data.root at a new or empty folder"
    )


def ensure_demo_dataset(
    root: str | os.PathLike, train_per_class: int = 300, val_per_class: int = 50, img_size: int = 32, seed: int = 0
) -> Path:
    """Returns ``root`` holding the demo dataset for these parameters, generating it when absent.

    * ``root`` missing or an empty folder: the dataset is generated (a log line says what and where).
    * A complete demo dataset with these parameters: reused as it is.
    * A demo dataset this generator wrote with other parameters, or with files missing: replaced, but only when
      every file in the folder is one its manifest lists, with the recorded size.
    * Anything else (no manifest, a manifest natzoo did not write, files natzoo did not write or that changed since):
      a ``ValueError`` naming the folder; nothing is written or deleted.

    Scratch folders that an interrupted generation or replacement of this ``root`` left behind on this host are
    removed first (see :mod:`natzoo.ownership`). Processes of this host that ask for the same ``root`` at once take
    turns (:meth:`natzoo.ownership.GeneratedFolder.exclusive`): a dataset the first one generated or replaced is
    reused by the next.
    """
    wanted = _params(train_per_class, val_per_class, img_size, seed)
    root = Path(root)
    if root.is_symlink():
        root = root.resolve()
    # Runs on this host that want this folder (a sweep, two terminals, the ranks of a node) take turns: the second
    # one finds the dataset the first one made and reuses it instead of replacing it at the same time.
    with _FOLDER.exclusive(root):
        _FOLDER.sweep(root)
        if root.exists() and not root.is_dir():
            raise _not_ours(root, "is a file, not a folder")
        if root.is_dir() and any(root.iterdir()):
            _reuse_or_remove(root, wanted)
            if root.exists():
                return root
        log.info("generating the demo dataset (%d classes, %d training + %d validation PNG images of %d px) in %s; "
                 "later runs with the same data.root reuse it", len(DEMO_CLASSES), train_per_class * len(DEMO_CLASSES),
                 val_per_class * len(DEMO_CLASSES), img_size, root.absolute())
        # A rank of a multi-node job that finishes second uses the first one's copy (GeneratedFolder.generate).
        return generate_demo_dataset(root, train_per_class, val_per_class, img_size, seed)


def _reuse_or_remove(root: Path, wanted: dict) -> None:
    """Returns with ``root`` intact if it is the wanted dataset, or removed if it is provably an outdated one."""
    try:
        manifest = _FOLDER.read_record(root)
    except FileNotFoundError:
        raise _not_ours(root, f"holds files but no {MANIFEST_NAME}") from None
    except (OSError, ValueError) as exc:
        raise _not_ours(root, f"holds a {MANIFEST_NAME} that cannot be read as JSON ({exc})") from None
    listed = _FOLDER.listed_files(manifest)
    if listed is None:
        raise _not_ours(root, f"holds a {MANIFEST_NAME} that natzoo's demo generator did not write")
    survey = _FOLDER.survey(root, listed)
    foreign, changed, missing = survey.foreign, survey.changed, survey.missing
    same = _FOLDER.matches(manifest, wanted)
    if same and not missing and not changed:
        if foreign:
            log.warning("the demo dataset in %s also holds files the generator did not write (%s); image files among "
                        "them are read as part of the dataset", root, ", ".join(foreign[:3]))
        return
    if foreign or changed:
        extra = ", ".join((foreign + changed)[:3])
        raise ValueError(
            f"data.root={str(root)!r} holds a demo dataset natzoo generated "
            f"{'with missing files' if same else 'with other parameters'}, but also files the generator did not write "
            f"or that changed since ({extra}{', ...' if len(foreign) + len(changed) > 3 else ''}); natzoo deletes only "
            "what it wrote, so it leaves this folder alone. Delete or move it yourself, or point data.root at a new or "
            "empty folder (data=folder trains on your own images)"
        )
    differs = {k: (manifest.get(k), v) for k, v in wanted.items() if manifest.get(k) != v}
    log.info("replacing the demo dataset in %s: %s", root,
             f"{len(missing)} of its files are missing" if same else
             "it was generated with " + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in differs.items()))
    _FOLDER.remove(root, survey)
