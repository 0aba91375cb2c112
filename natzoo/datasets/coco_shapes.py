"""A small, deterministic COCO-format detection dataset of drawn shapes (the detection demo's default data).

Each image is a noisy background with one to ``max_objects`` non-overlapping filled shapes (rotated rectangle,
ellipse, triangle). Every shape is drawn from the polygon that is stored as its COCO segmentation, so boxes, masks
and pixels agree exactly. The dataset is written as PNG files plus one COCO JSON per split and cached on disk under
a directory named after a hash of the generation parameters, with ``generation.json`` (written last) listing the
parameters and every file with its size: natzoo's one protocol of generated data (:class:`natzoo.ownership
.GeneratedFolder`). A folder at that path which is not such a complete dataset is never written into or deleted
(docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from natzoo.ownership import GeneratedFolder

__all__ = ["SHAPE_CATEGORIES", "SyntheticCocoSpec", "default_cache_dir", "make_synthetic_coco"]

SHAPE_CATEGORIES: tuple[str, ...] = ("rectangle", "ellipse", "triangle")

_DONE_FILE = "generation.json"
_GENERATOR = "natzoo.detection.synthetic"  # the name it had when it wrote the first caches; kept so they are reused
# Every path the generator writes, relative to the dataset folder (folders with a trailing "/").
_WRITES = re.compile(
    rf"(?:train|val)/(?:\d{{6,}}\.png)?|annotations/(?:instances_(?:train|val)\.json)?|{re.escape(_DONE_FILE)}"
)
_FOLDER = GeneratedFolder(_GENERATOR, _DONE_FILE, lambda rel: _WRITES.fullmatch(rel) is not None)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticCocoSpec:
    """Parameters of the generated dataset; together they name its cache directory.

    Attributes:
        num_train: Number of training images.
        num_val: Number of validation images.
        image_size: Side of the square images in pixels.
        min_objects: Fewest shapes per image (at least 1).
        max_objects: Most shapes per image.
        min_shape_size: Smallest shape extent in pixels.
        max_shape_size: Largest shape extent in pixels.
        seed: Seed of the generator; the same spec always produces the same files.
    """

    num_train: int = 256
    num_val: int = 64
    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 3
    min_shape_size: int = 24
    max_shape_size: int = 56
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_train", "num_val", "image_size", "min_objects", "max_objects", "min_shape_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SyntheticCocoSpec.{name} must be a positive int, got {value!r}")
        if self.max_objects < self.min_objects:
            raise ValueError(f"max_objects ({self.max_objects}) must be >= min_objects ({self.min_objects})")
        if not self.min_shape_size <= self.max_shape_size <= self.image_size:
            raise ValueError(
                f"need min_shape_size <= max_shape_size <= image_size, got {self.min_shape_size}, "
                f"{self.max_shape_size}, {self.image_size}"
            )

    def fingerprint(self) -> str:
        """Short hash of the parameters (and the generator version) used as the cache directory name."""
        payload = json.dumps({"version": 1, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """Root of natzoo's generated data: ``$NATZOO_CACHE`` or ``~/.cache/natzoo``."""
    return Path(os.environ.get("NATZOO_CACHE", Path.home() / ".cache" / "natzoo"))


def _shape_polygon(kind: str, cx: float, cy: float, size: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Vertices (x, y) of one shape of extent about ``size`` centred at (cx, cy)."""
    angle = rng.uniform(0.0, math.pi)
    if kind == "rectangle":
        half_w, half_h = size / 2, size * rng.uniform(0.45, 1.0) / 2
        corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
        angle = rng.uniform(0.0, math.pi / 2)
    elif kind == "ellipse":
        rx, ry = size / 2, size * rng.uniform(0.55, 1.0) / 2
        corners = [(rx * math.cos(t), ry * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    else:
        r = size / 2
        corners = [(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    return [(cx + x * cos_a - y * sin_a, cy + x * sin_a + y * cos_a) for x, y in corners]


def _polygon_area(points: list[tuple[float, float]]) -> float:
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    return float(abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2)


def _generate_split(spec: SyntheticCocoSpec, split: str, count: int, seed: int, out_dir: Path) -> dict:
    rng = np.random.default_rng(seed)
    image_dir = out_dir / split
    image_dir.mkdir(parents=True)
    side = spec.image_size
    images: list[dict] = []
    annotations: list[dict] = []
    for image_index in range(count):
        image_id = image_index + 1
        background = rng.integers(0, 96, size=3)
        noise = rng.normal(0.0, 12.0, size=(side, side, 3))
        canvas = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        placed: list[tuple[float, float, float, float]] = []
        for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
            # Rejection-sample a position whose box stays inside the image and clear of the shapes already drawn.
            for _attempt in range(50):
                kind_index = int(rng.integers(len(SHAPE_CATEGORIES)))
                size = float(rng.uniform(spec.min_shape_size, spec.max_shape_size))
                cx, cy = rng.uniform(size / 2, side - size / 2, size=2)
                polygon = _shape_polygon(SHAPE_CATEGORIES[kind_index], cx, cy, size, rng)
                x0 = max(0.0, min(p[0] for p in polygon))
                y0 = max(0.0, min(p[1] for p in polygon))
                x1 = min(float(side), max(p[0] for p in polygon))
                y1 = min(float(side), max(p[1] for p in polygon))
                if all(x1 + 2 < px0 or px1 + 2 < x0 or y1 + 2 < py0 or py1 + 2 < y0 for px0, py0, px1, py1 in placed):
                    break
            else:
                continue
            placed.append((x0, y0, x1, y1))
            colour = tuple(int(c) for c in rng.integers(128, 256, size=3))
            draw.polygon(polygon, fill=colour)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": kind_index + 1,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round(_polygon_area(polygon), 2),
                    "iscrowd": 0,
                    "segmentation": [[round(v, 2) for point in polygon for v in point]],
                }
            )
        file_name = f"{image_id:06d}.png"
        canvas.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": side, "height": side})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CATEGORIES)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (out_dir / "annotations").mkdir(exist_ok=True)
    with open(out_dir / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(coco, f)
    return coco


def _generate(spec: SyntheticCocoSpec, out_dir: Path) -> None:
    _generate_split(spec, "train", spec.num_train, spec.seed, out_dir)
    _generate_split(spec, "val", spec.num_val, spec.seed + 1_000_003, out_dir)


def make_synthetic_coco(spec: SyntheticCocoSpec | None = None, root: str | os.PathLike | None = None) -> Path:
    """Generate (or reuse) the shapes dataset and return its directory.

    The directory holds ``train/`` and ``val/`` PNG folders and ``annotations/instances_{train,val}.json``. It is
    built in a temporary sibling directory and renamed into place, so a crashed or concurrent run never leaves a
    half-written dataset behind; the temporary directory of a process that was killed is removed by the next call
    on the same host (see :mod:`natzoo.ownership`).

    Args:
        spec: Generation parameters (defaults of :class:`SyntheticCocoSpec` if None).
        root: Parent directory of the cache (default :func:`default_cache_dir`).

    Returns:
        The dataset directory ``<root>/coco_shapes_<fingerprint>``.

    Raises:
        ValueError: If that path exists and is not an empty folder or a complete dataset generated for ``spec``
            (nothing is written or deleted then).
    """
    spec = spec or SyntheticCocoSpec()
    root = Path(root) if root is not None else default_cache_dir()
    name = f"coco_shapes_{spec.fingerprint()}"
    target = root / name
    wanted = {"spec": asdict(spec)}
    # Runs of one host take turns (as the classification demo's): a sweep never removes another's work in progress.
    with _FOLDER.exclusive(target):
        _FOLDER.sweep(target)
        if _FOLDER.is_complete(target, wanted):
            return target
        if target.exists() and not (target.is_dir() and not any(target.iterdir())):
            raise ValueError(
                f"{target} exists but is not a complete shapes dataset natzoo generated for these parameters (no "
                f"valid {_DONE_FILE}, or files it lists are missing or changed); natzoo never writes into or deletes "
                "such a folder. Move it away, or set data.cache_dir to another folder"
            )
        log.info("generating the detection demo dataset (%d training + %d validation images of %d px, COCO format) "
                 "in %s", spec.num_train, spec.num_val, spec.image_size, target.absolute())
        # Another host that finishes the same dataset first wins; its copy is identical (same seed and parameters).
        return _FOLDER.generate(target, wanted, lambda out: _generate(spec, out))
