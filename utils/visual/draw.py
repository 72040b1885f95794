"""Drawing detections on images: a box and a ``name score`` label per detection, one colour per class."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple

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
