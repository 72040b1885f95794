"""Synthetic COCO-format datasets of shapes, for the tests, the examples and the benchmarks
(``tools/make_shape_dataset.py`` is the command line).

Two classes, rectangle = 1 and circle = 2 (with ``aspect``: long thin rectangles = 1 and ellipses = 2), in the
published layout: ``OUT/train/0.jpg …``, ``OUT/val/N.jpg …``, ``OUT/annotations/instances_{set}.json``. Image
ids start at 0 in each json (as ``../shared/data/shape``); file names continue across the sets. Boxes
``[x, y, w, h]`` cover exactly the pixels drawn. Shapes may overlap; some images have none (negatives).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from efficientdet.coco import annotation_path

logger = logging.getLogger(__name__)

CATEGORIES = [{"id": 1, "name": "rectangle", "supercategory": "None"},
              {"id": 2, "name": "circle", "supercategory": "None"}]
#: With ``aspect``: long thin rectangles and ellipses.
ELONGATED_CATEGORIES = [{"id": 1, "name": "rectangle", "supercategory": "None"},
                        {"id": 2, "name": "ellipse", "supercategory": "None"}]


def _draw_elongated(image: np.ndarray, rng: np.random.Generator, aspect: Tuple[float, float],
                    color: Tuple[int, ...]) -> Tuple[int, List[float]]:
    """One axis-aligned rectangle or ellipse, long side ``aspect`` (uniform in the range) times the short
    one, lying or standing at random; returns ``(category_id, [x, y, w, h])`` covering the drawn pixels."""
    size = image.shape[0]
    ratio = float(rng.uniform(*aspect))
    short = int(rng.integers(max(4, size // 32), max(5, int(0.75 * size / ratio) // 2 + 2)))
    long = min(size - 1, max(short + 1, int(round(short * ratio))))
    w, h = (long, short) if rng.random() < 0.5 else (short, long)
    ellipse = rng.random() < 0.5
    if ellipse:  # odd sides 2a + 1, 2b + 1: the ellipse fills exactly its box
        w, h = min(w | 1, size - 1), min(h | 1, size - 1)
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    if ellipse:
        cv2.ellipse(image, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, color, thickness=-1)
        return 2, [float(x), float(y), float(w), float(h)]
    cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), color, thickness=-1)
    return 1, [float(x), float(y), float(w), float(h)]


def _draw_image(rng: np.random.Generator, size: int, max_shapes: int, aspect: Optional[Tuple[float, float]] = None
                ) -> Tuple[np.ndarray, List[Tuple[int, List[float]]]]:
    """One BGR ``np.ndarray[size, size, 3] uint8`` and its shapes as ``(category_id, [x, y, w, h])``."""
    background = rng.integers(0, 96, size=3)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = background.astype(np.uint8)
    shapes: List[Tuple[int, List[float]]] = []
    min_side, max_side = max(4, size // 16), max(8, size // 4)
    for _ in range(int(rng.integers(0, max_shapes + 1))):
        color = tuple(int(c) for c in rng.integers(128, 256, size=3))  # brighter than the background
        if aspect is not None:
            shapes.append(_draw_elongated(image, rng, aspect, color))
        elif rng.random() < 0.5:
            w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), color, thickness=-1)
            shapes.append((1, [float(x), float(y), float(w), float(h)]))
        else:
            r = int(rng.integers(min_side // 2, max_side // 2 + 1))
            cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
            cv2.circle(image, (cx, cy), r, color, thickness=-1)
            shapes.append((2, [float(cx - r), float(cy - r), float(2 * r + 1), float(2 * r + 1)]))
    return image, shapes


def make_shape_dataset(out: Path, num_train: int = 900, num_val: int = 100, size: int = 512, seed: int = 0,
                       max_shapes: int = 4, aspect: Optional[Tuple[float, float]] = None) -> Dict[str, Path]:
    """Write the dataset under ``out``; returns ``{set_name: annotation json path}``.

    ``aspect`` (min, max): elongated shapes instead, long thin rectangles (1) and ellipses (2) whose long
    side is that many times the short one. Deterministic for a given ``seed``. Raises ValueError for
    non-positive sizes, negative counts or an aspect range outside [1, size / 6].
    """
    if size < 32 or num_train < 0 or num_val < 0 or max_shapes < 0:
        raise ValueError(f"need size >= 32 and non-negative counts, got size={size}, num_train={num_train}, "
                         f"num_val={num_val}, max_shapes={max_shapes}")
    if aspect is not None and not 1.0 <= aspect[0] <= aspect[1] <= size / 6:
        raise ValueError(f"aspect must satisfy 1 <= min <= max <= size / 6 = {size / 6:g}, got {aspect}")
    categories = CATEGORIES if aspect is None else ELONGATED_CATEGORIES
    out = Path(out)
    rng = np.random.default_rng(seed)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}
    file_index = 0
    for set_name, count in (("train", num_train), ("val", num_val)):
        (out / set_name).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(count):
            image, shapes = _draw_image(rng, size, max_shapes, aspect)
            file_name = f"{file_index}.jpg"
            file_index += 1
            if not cv2.imwrite(str(out / set_name / file_name), image, [cv2.IMWRITE_JPEG_QUALITY, 95]):
                raise ValueError(f"cannot write image {out / set_name / file_name}")
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for category_id, (x, y, w, h) in shapes:
                annotations.append({"id": len(annotations), "image_id": image_id, "category_id": category_id,
                                    "iscrowd": 0, "area": w * h, "bbox": [x, y, w, h],
                                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        path = annotation_path(out, set_name)
        path.write_text(json.dumps({"info": {"description": "synthetic shapes"}, "licenses": [],
                                    "categories": categories, "images": images, "annotations": annotations}),
                        encoding="utf-8")
        logger.info("%s: %d images, %d boxes", path, len(images), len(annotations))
        written[set_name] = path
    return written
