"""Drawing detections on images: a box and a ``name score`` label per detection, one colour per class; a grid
of augmented training samples with their boxes (``--debug``)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import webcolors

Color = Tuple[int, int, int]

# Colours whose luma is above this are skipped: white text boxes on white-ish colours are unreadable.
MAX_LUMA = 200.0


def name_to_bgr(name: str) -> Color:
    """A CSS3 colour name (any case, e.g. ``"LawnGreen"``) -> its BGR triple; ValueError for an unknown name."""
    rgb = webcolors.name_to_rgb(name)
    return int(rgb.blue), int(rgb.green), int(rgb.red)


@lru_cache(maxsize=1)
def palette() -> Tuple[Color, ...]:
    """BGR colours from webcolors' CSS3 names, sorted by name, without very light ones (deterministic)."""
    colors = []
    seen = set()
    for name in sorted(webcolors.names("css3")):
        bgr = name_to_bgr(name)
        luma = 0.299 * bgr[2] + 0.587 * bgr[1] + 0.114 * bgr[0]
        # Very light colours and aliases (grey/gray, aqua/cyan) are left out.
        if luma <= MAX_LUMA and bgr not in seen:
            seen.add(bgr)
            colors.append(bgr)
    return tuple(colors)


def color_for_class(class_id: int) -> Color:
    """The BGR colour of a class: the same for the same id, everywhere and every run."""
    colors = palette()
    # A stride coprime with the palette size spreads neighbouring ids over different hues.
    stride = 7 if len(colors) % 7 else 11
    return colors[(int(class_id) * stride) % len(colors)]


def line_thickness(image: np.ndarray) -> int:
    """Box line thickness for an image: about 0.2 % of its longer side, at least 1 pixel."""
    return max(1, int(round(0.002 * max(image.shape[:2]))))


def draw_box(image: np.ndarray, box: Sequence[float], color: Color, label: Optional[str] = None,
             thickness: Optional[int] = None) -> None:
    """Draw one box ``(x1, y1, x2, y2)`` (image pixels) and an optional label on a BGR uint8 image, in place."""
    thickness = thickness or line_thickness(image)
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    cv2.rectangle(image, (x1, y1), (x2, y2), color, thickness=thickness)
    if not label:
        return
    font_scale = max(0.4, thickness / 3.0)
    font_thickness = max(1, thickness - 1)
    (text_w, text_h), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, font_thickness)
    # Label above the box, or inside it when the box touches the top edge.
    top = y1 - text_h - baseline - 2
    if top < 0:
        top = y1
    cv2.rectangle(image, (x1, top), (x1 + text_w + 2, top + text_h + baseline + 2), color, thickness=-1)
    luma = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
    text_color = (0, 0, 0) if luma > 128 else (255, 255, 255)
    cv2.putText(image, label, (x1 + 1, top + text_h + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, text_color,
                thickness=font_thickness, lineType=cv2.LINE_AA)


def draw_detections(image: np.ndarray, boxes: np.ndarray, class_ids: np.ndarray, scores: np.ndarray,
                    class_names: Sequence[str]) -> np.ndarray:
    """A copy of ``image`` (BGR uint8 ``[H, W, 3]``) with every detection drawn.

    Args:
        boxes: ``[K, 4] (x1, y1, x2, y2)``, image pixels.
        class_ids: ``[K]`` class index (chooses the colour).
        scores: ``[K]`` in [0, 1].
        class_names: ``[K]`` names for the labels (``"class N"`` where empty).
    """
    if not (len(boxes) == len(class_ids) == len(scores) == len(class_names)):
        raise ValueError(f"boxes, class_ids, scores and class_names differ in length: "
                         f"{len(boxes)}, {len(class_ids)}, {len(scores)}, {len(class_names)}")
    canvas = np.ascontiguousarray(image).copy()
    thickness = line_thickness(canvas)
    for box, class_id, score, name in zip(boxes, class_ids, scores, class_names):
        label = f"{name or f'class {int(class_id)}'} {float(score):.2f}"
        draw_box(canvas, box, color_for_class(int(class_id)), label=label, thickness=thickness)
    return canvas


def augmentation_grid(dataset: Any, path: Union[str, Path], mean: Sequence[float], std: Sequence[float],
                      count: int = 16, columns: int = 4, tile: int = 256) -> Path:
    """Samples ``0 … count - 1`` of ``dataset`` (as training transforms them: ``dataset[i]`` is a dict with
    'img' ``np.ndarray[S, S, 3]`` normalised RGB and 'annot' ``np.ndarray[M, 5] (x1, y1, x2, y2, label)``, pixels
    of 'img') de-normalised (``img · std + mean``), their boxes drawn in the colour of their class, in a grid of
    ``columns`` tiles of ``tile × tile`` pixels per row, written as a JPEG to ``path``; returns ``path``.
    Fewer samples than ``count``: as many as there are (empty tiles black)."""
    count = min(int(count), len(dataset))
    if count < 1 or columns < 1 or tile < 1:
        raise ValueError(f"augmentation_grid: need a non-empty dataset, columns >= 1, tile >= 1, got "
                         f"{len(dataset)} samples, columns={columns}, tile={tile}")
    rows = (count + columns - 1) // columns
    grid = np.zeros((rows * tile, columns * tile, 3), dtype=np.uint8)
    mean_, std_ = np.asarray(mean, np.float64).reshape(1, 1, 3), np.asarray(std, np.float64).reshape(1, 1, 3)
    for i in range(count):
        sample: Dict[str, Any] = dataset[i]
        image = np.asarray(sample["img"], dtype=np.float64) * std_ + mean_
        scale = tile / max(image.shape[:2])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        bgr = np.ascontiguousarray((np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)[..., ::-1])
        bgr = np.ascontiguousarray(cv2.resize(bgr, size, interpolation=cv2.INTER_AREA))
        for box in np.asarray(sample["annot"], dtype=np.float64).reshape(-1, 5):
            draw_box(bgr, box[:4] * scale, color_for_class(int(box[4])), thickness=1)
        row, column = divmod(i, columns)
        grid[row * tile:row * tile + bgr.shape[0], column * tile:column * tile + bgr.shape[1]] = bgr
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), grid):
        raise ValueError(f"augmentation_grid: cannot write {path}")
    return path
