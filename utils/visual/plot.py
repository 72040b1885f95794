"""Training curves as a PNG (drawn with OpenCV: no plotting library needed)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import cv2
import numpy as np

Series = Tuple[str, Sequence[Tuple[float, float]], Tuple[int, int, int]]


def plot_curves(series: Sequence[Series], path: Union[str, Path], title: str = "", log_y: bool = True,
                size: Tuple[int, int] = (900, 500)) -> Path:
    """Draw line series ``(name, [(x, y), ...], BGR colour)`` on one chart and write it to ``path``.

    ``log_y`` plots log10(y) for positive values (losses span decades). Returns the path.
    """
    width, height = size
    left, right, top, bottom = 70, 20, 40, 40
    canvas = np.full((height, width, 3), 255, np.uint8)
    cleaned: List[Tuple[str, np.ndarray, Tuple[int, int, int]]] = []
    for name, points, color in series:
        pts = np.array([(x, y) for x, y in points if math.isfinite(y) and (y > 0 or not log_y)], dtype=np.float64)
        if len(pts):
            if log_y:
                pts[:, 1] = np.log10(pts[:, 1])
            cleaned.append((name, pts, color))
    if cleaned:
        xs = np.concatenate([p[:, 0] for _, p, _ in cleaned])
        ys = np.concatenate([p[:, 1] for _, p, _ in cleaned])
        x0, x1 = float(xs.min()), float(max(xs.max(), xs.min() + 1))
        y0, y1 = float(ys.min()), float(ys.max())
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.5, y1 + 0.5

        def to_px(p: np.ndarray) -> np.ndarray:
            px = left + (p[:, 0] - x0) / (x1 - x0) * (width - left - right)
            py = height - bottom - (p[:, 1] - y0) / (y1 - y0) * (height - top - bottom)
            return np.stack([px, py], axis=1).round().astype(np.int32)

        cv2.rectangle(canvas, (left, top), (width - right, height - bottom), (180, 180, 180), 1)
        for k in range(5):
            value = y0 + (y1 - y0) * k / 4
            y = int(round(height - bottom - k / 4 * (height - top - bottom)))
            label = f"{10 ** value:.3g}" if log_y else f"{value:.3g}"
            cv2.putText(canvas, label, (4, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
            cv2.line(canvas, (left, y), (width - right, y), (230, 230, 230), 1)
        cv2.putText(canvas, f"step {x0:.0f}", (left, height - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (60, 60, 60), 1)
        cv2.putText(canvas, f"step {x1:.0f}", (width - right - 90, height - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (60, 60, 60), 1)
        for i, (name, pts, color) in enumerate(cleaned):
            px = to_px(pts)
            if len(px) == 1:
                cv2.circle(canvas, tuple(int(v) for v in px[0]), 3, color, -1)
            else:
                cv2.polylines(canvas, [px.reshape(-1, 1, 2)], False, color, 2, cv2.LINE_AA)
            cv2.putText(canvas, name, (left + 10 + 150 * i, top - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, 1,
                        cv2.LINE_AA)
    if title:
        cv2.putText(canvas, title, (width // 2 - 4 * len(title), 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise ValueError(f"could not write {path}")
    return path


def plot_training_log(records: Sequence[Dict[str, float]], path: Union[str, Path], title: str = "") -> Path:
    """Train and val loss curves from ``train_log.jsonl`` records (``kind``, ``step``, ``loss``)."""
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    val = [(r["step"], r["loss"]) for r in records if r.get("kind") == "val" and "loss" in r]
    return plot_curves([("train loss", train, (200, 120, 0)), ("val loss", val, (0, 0, 220))], path, title)
