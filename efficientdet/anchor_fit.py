"""How well the anchors fit a dataset's boxes, and anchors that fit better.

Every ground-truth box is mapped as the training loader maps it (the letterbox of
:func:`efficientdet.transforms.letterbox_size`: ``scale = input_size / max(height, width)``). Its best anchor
is the anchor of highest IoU among all levels, positions and (scale, ratio) pairs of
:class:`efficientdet.anchors.Anchors`. For a fixed anchor shape the IoU only falls as the centres move apart,
in x and in y separately, so the best anchor of each shape is the one centred at the grid point nearest to the
box centre: the best IoU is exact, without building the ``N`` anchors.

The best-possible recall (BPR) is the share of boxes whose best anchor reaches the positive IoU (0.5 in both
loss formulations). The published loss ("yaep") has no forced matches: a box below it is never a
positive, the network is never taught to find it. The official loss force-matches every box to its best
anchor, so every box gets one positive, but a box below 0.5 gets only that one, from an anchor that overlaps
it poorly; the BPR counts such boxes as missed in both.

:func:`fit_anchors` proposes ``anchors_scales`` and ``anchors_ratios`` (3 × 3 by default, the shape of the
published heads): k-means on the boxes' log aspect ratios and log sizes for a start, then a coordinate
search on the fitness (BPR + 0.1 × mean best IoU) itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from efficientdet.anchors import anchor_sizes
from efficientdet.transforms import letterbox_size

#: The positive IoU of both loss formulations (DEVELOPING.md, 'The two losses').
POSITIVE_IOU = 0.5
#: Below this best-possible recall ``train.py`` warns.
MIN_RECALL = 0.95
#: Area bands (input pixels²) of the report, COCO's limits: small < 32², medium < 96², large.
SIZE_BANDS: Tuple[Tuple[str, float, float], ...] = (("small", 0.0, 32.0 ** 2), ("medium", 32.0 ** 2, 96.0 ** 2),
                                                     ("large", 96.0 ** 2, math.inf))
#: Weight of the mean best IoU in the fitness (the recall decides; the IoU separates equal recalls).
IOU_WEIGHT = 0.1


@dataclass(frozen=True)
class AnchorGrid:
    """The anchors of a model at one input size: ``anchor_scale · stride · scale · (rx, ry)`` wide and high,
    centred at ``stride / 2 + k · stride`` on each level (as :class:`efficientdet.anchors.Anchors`)."""

    anchor_scale: float
    strides: Tuple[int, ...]
    scales: Tuple[float, ...]
    ratios: Tuple[Tuple[float, float], ...]
    height: int
    width: int

    def with_anchors(self, scales: Sequence[float], ratios: Sequence[Tuple[float, float]]) -> "AnchorGrid":
        return AnchorGrid(self.anchor_scale, self.strides, tuple(float(s) for s in scales),
                          tuple((float(r[0]), float(r[1])) for r in ratios), self.height, self.width)

    def shapes(self) -> np.ndarray:
        """``np.ndarray[L, A, 2]`` (width, height) of every anchor shape per level, in the Anchors order
        (scale varying slowest)."""
        return np.array([anchor_sizes(self.anchor_scale, stride, self.scales, self.ratios) for stride in self.strides],
                        dtype=np.float64)


def _nearest_centres(centres: np.ndarray, stride: int, side: int) -> np.ndarray:
    """The anchor centre (``stride / 2 + k · stride < side``) nearest to each of ``centres``."""
    count = len(np.arange(stride / 2, side, stride))
    k = np.clip(np.round((centres - stride / 2) / stride), 0, count - 1)
    return stride / 2 + k * stride


def best_anchor_iou(boxes: np.ndarray, grid: AnchorGrid) -> np.ndarray:
    """boxes: ``np.ndarray[K, 4] (x1, y1, x2, y2)``, input pixels -> ``np.ndarray[K]``: the IoU of each box with
    its best anchor (exact, see the module docstring)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    best = np.zeros(len(boxes))
    if not len(boxes):
        return best
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for stride, shapes in zip(grid.strides, grid.shapes()):
        ax = _nearest_centres(cx, stride, grid.width)[:, None]
        ay = _nearest_centres(cy, stride, grid.height)[:, None]
        half_w, half_h = shapes[None, :, 0] / 2, shapes[None, :, 1] / 2
        inter_w = np.clip(np.minimum(boxes[:, 2:3], ax + half_w) - np.maximum(boxes[:, 0:1], ax - half_w), 0, None)
        inter_h = np.clip(np.minimum(boxes[:, 3:4], ay + half_h) - np.maximum(boxes[:, 1:2], ay - half_h), 0, None)
        inter = inter_w * inter_h
        iou = inter / np.maximum(area[:, None] + shapes[None, :, 0] * shapes[None, :, 1] - inter, 1e-12)
        best = np.maximum(best, iou.max(axis=1))
    return best


def letterboxed_boxes(boxes: np.ndarray, image_hw: Tuple[int, int], input_size: int) -> np.ndarray:
    """``np.ndarray[K, 4] (x1, y1, x2, y2)`` original pixels of an image ``(height, width)`` -> input pixels,
    as the training loader's ``Resizer`` maps them."""
    scale = letterbox_size(int(image_hw[0]), int(image_hw[1]), int(input_size))[2]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale


def fitness(best_iou: np.ndarray, threshold: float = POSITIVE_IOU) -> float:
    """BPR plus :data:`IOU_WEIGHT` × mean best IoU (the quantity :func:`fit_anchors` maximises)."""
    if not len(best_iou):
        return 0.0
    return float(np.mean(best_iou >= threshold) + IOU_WEIGHT * np.mean(best_iou))


@dataclass(frozen=True)
class AnchorReport:
    """How the anchors of ``grid`` cover ``num_boxes`` boxes.

    Attributes:
        recall: best-possible recall, the share of boxes whose best IoU reaches ``threshold``.
        mean_iou: mean best IoU.
        best_iou: ``np.ndarray[K]`` the best IoU of every box.
        per_class: class name -> (boxes, recall, median best IoU).
        per_band: size band -> (boxes, recall, median best IoU).
        too_small / too_large: boxes below ``threshold`` smaller than the smallest anchor (area) / larger
            than the largest: no level can cover them whatever the ratios.
    """

    grid: AnchorGrid
    threshold: float
    recall: float
    mean_iou: float
    best_iou: np.ndarray
    per_class: Dict[str, Tuple[int, float, float]]
    per_band: Dict[str, Tuple[int, float, float]]
    too_small: int
    too_large: int

    @property
    def num_boxes(self) -> int:
        return len(self.best_iou)


def _summary(best_iou: np.ndarray, threshold: float) -> Tuple[int, float, float]:
    if not len(best_iou):
        return 0, math.nan, math.nan
    return len(best_iou), float(np.mean(best_iou >= threshold)), float(np.median(best_iou))


def measure_anchors(boxes: np.ndarray, labels: np.ndarray, class_names: Sequence[str], grid: AnchorGrid,
                    threshold: float = POSITIVE_IOU) -> AnchorReport:
    """The :class:`AnchorReport` of ``boxes`` (``np.ndarray[K, 4] (x1, y1, x2, y2)``, input pixels) with class
    indices ``labels`` (``np.ndarray[K]``, into ``class_names``). ValueError when there are no boxes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if not len(boxes):
        raise ValueError("no boxes to measure the anchors against")
    best = best_anchor_iou(boxes, grid)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    anchor_areas = np.prod(grid.shapes(), axis=-1)
    missed = best < threshold
    per_class = {name: _summary(best[labels == index], threshold) for index, name in enumerate(class_names)
                 if np.any(labels == index)}
    per_band = {name: _summary(best[(area >= low) & (area < high)], threshold) for name, low, high in SIZE_BANDS}
    return AnchorReport(grid, threshold, float(np.mean(~missed)), float(np.mean(best)), best, per_class, per_band,
                        int(np.sum(missed & (area < anchor_areas.min()))),
                        int(np.sum(missed & (area > anchor_areas.max()))))


def format_report(report: AnchorReport, title: str) -> List[str]:
    """The report as printable lines: recall, IoU quantiles, per class, per size band, uncoverable boxes."""
    q = np.quantile(report.best_iou, [0.05, 0.25, 0.5, 0.75])
    lines = [f"{title}: scales {_fmt(report.grid.scales)}, ratios {_fmt(report.grid.ratios)}",
             f"  best-possible recall (best anchor IoU >= {report.threshold:g}): {report.recall:.4f} of "
             f"{report.num_boxes} boxes; mean best IoU {report.mean_iou:.3f}; quantiles 5/25/50/75 %: "
             + " ".join(f"{v:.3f}" for v in q)]
    for label, table in (("class", report.per_class), ("size", report.per_band)):
        for name, (count, recall, median) in table.items():
            if count:
                lines.append(f"  {label} {name:>12s}: {count:6d} boxes, recall {recall:.4f}, median IoU {median:.3f}")
    lines.append(f"  boxes below {report.threshold:g} smaller than the smallest anchor: {report.too_small}; "
                 f"larger than the largest: {report.too_large}")
    return lines


def _fmt(values) -> str:
    return "[" + ", ".join(f"({v[0]:.4g}, {v[1]:.4g})" if isinstance(v, tuple) else f"{v:.4g}" for v in values) + "]"


def _kmeans_1d(values: np.ndarray, k: int, iterations: int = 50) -> np.ndarray:
    """k centres of ``values`` (sorted), started at evenly spaced quantiles."""
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        assign = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        updated = np.array([values[assign == j].mean() if np.any(assign == j) else centres[j] for j in range(k)])
        if np.allclose(updated, centres):
            break
        centres = updated
    return np.sort(centres)


def _ratios(log_aspects: Sequence[float]) -> Tuple[Tuple[float, float], ...]:
    """Aspects ``h / w = exp(a)`` as area-preserving (rx, ry) stretches ``(exp(-a / 2), exp(a / 2))``."""
    return tuple((math.exp(-a / 2), math.exp(a / 2)) for a in log_aspects)


def _search(boxes: np.ndarray, grid: AnchorGrid, exponents: np.ndarray, aspects: np.ndarray,
            threshold: float) -> Tuple[float, np.ndarray, np.ndarray]:
    """Coordinate search on the fitness over scale exponents (``2 ** e``) and log aspects, steps halving."""
    def score(e: np.ndarray, a: np.ndarray) -> float:
        return fitness(best_anchor_iou(boxes, grid.with_anchors(2.0 ** e, _ratios(a))), threshold)

    best = score(exponents, aspects)
    step = 0.25
    while step > 0.005:
        improved = False
        for vector in (exponents, aspects):
            for i in range(len(vector)):
                for delta in (step, -step):
                    vector[i] += delta
                    trial = score(exponents, aspects)
                    if trial > best + 1e-12:
                        best, improved = trial, True
                        break
                    vector[i] -= delta
        if not improved:
            step /= 2
    return best, exponents, aspects


def fit_anchors(boxes: np.ndarray, grid: AnchorGrid, num_scales: int = 3, num_ratios: int = 3,
                threshold: float = POSITIVE_IOU) -> AnchorGrid:
    """Anchors for ``boxes`` (``np.ndarray[K, 4] (x1, y1, x2, y2)``, input pixels): ``grid`` with new scales and
    ratios, the best of three starts (``grid``'s own anchors; k-means on the boxes' log aspect ratios and on
    their log sizes relative to the level that fits them; the same sizes with aspects spread evenly over
    lying and standing), each refined by a coordinate search on :func:`fitness`. Never less fit than
    ``grid`` when the counts match. Scales are sorted ascending; ratios by aspect (wide first)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        raise ValueError("no boxes to fit the anchors to")
    if num_scales < 1 or num_ratios < 1:
        raise ValueError(f"need at least one scale and one ratio, got {num_scales} and {num_ratios}")
    w = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-6)
    h = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
    # Size in octaves above the smallest level's anchor, less the level that fits it best: the scale exponent
    # it wants (below 0 under the smallest level, 1 or more over the largest).
    octave = np.log2(np.sqrt(w * h) / (grid.anchor_scale * grid.strides[0]))
    residual = octave - np.clip(np.floor(octave), 0, len(grid.strides) - 1)
    aspect = np.log(h / w)
    spread = float(np.median(np.abs(aspect)))
    kmeans_exponents = _kmeans_1d(residual, num_scales)
    starts = [(kmeans_exponents, _kmeans_1d(aspect, num_ratios)),  # k-means on sizes and aspects
              (kmeans_exponents, np.linspace(-spread, spread, num_ratios))]  # lying and standing alike
    if (len(grid.scales), len(grid.ratios)) == (num_scales, num_ratios):
        starts.insert(0, (np.log2(np.array(grid.scales)), np.log(np.array([r[1] / r[0] for r in grid.ratios]))))
    results = [_search(boxes, grid, e.astype(np.float64).copy(), a.astype(np.float64).copy(), threshold)
               for e, a in starts]
    _, exponents, aspects = max(results, key=lambda r: r[0])
    return grid.with_anchors(tuple(sorted(2.0 ** exponents)), _ratios(sorted(aspects)))


def yaml_lines(grid: AnchorGrid, digits: int = 4) -> Tuple[str, str]:
    """The project YAML lines ``anchors_scales: '[...]'`` and ``anchors_ratios: '[(...), ...]'`` of ``grid``."""
    scales = ", ".join(f"{s:.{digits}f}" for s in grid.scales)
    ratios = ", ".join(f"({r[0]:.{digits}f}, {r[1]:.{digits}f})" for r in grid.ratios)
    return f"anchors_scales: '[{scales}]'", f"anchors_ratios: '[{ratios}]'"


def dataset_boxes(dataset, input_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """All boxes of a :class:`efficientdet.dataset.CocoDataset` as the training loader maps them at
    ``input_size``: ``(np.ndarray[K, 4] (x1, y1, x2, y2) input pixels, np.ndarray[K] class indices)``. Reads
    the annotations and the sizes recorded in the JSON, no image."""
    boxes: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    for index in range(len(dataset)):
        annotations = dataset.load_annotations(index)
        if len(annotations):
            boxes.append(letterboxed_boxes(annotations[:, :4], dataset.image_hw(index), input_size))
            labels.append(annotations[:, 4].astype(np.int64))
    if not boxes:
        return np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
    return np.concatenate(boxes), np.concatenate(labels)


def anchor_grid(config, scales: Sequence[float], ratios: Sequence[Tuple[float, float]],
                input_size: Optional[int] = None) -> AnchorGrid:
    """The :class:`AnchorGrid` of a model (``efficientdet.config.ModelConfig``) at ``input_size`` (default its own)."""
    size = int(input_size or config.input_size)
    return AnchorGrid(float(config.anchor_scale), tuple(2 ** level for level in config.pyramid_levels),
                      tuple(float(s) for s in scales), tuple((float(r[0]), float(r[1])) for r in ratios), size, size)


def anchor_fit_warning(dataset, config, scales: Sequence[float], ratios: Sequence[Tuple[float, float]],
                       input_size: int, command: str, min_recall: float = MIN_RECALL) -> Optional[str]:
    """One line when the anchors' best-possible recall on ``dataset`` (a training
    :class:`efficientdet.dataset.CocoDataset`) at ``input_size`` is below ``min_recall``, naming the figure and
    ``command`` (the fitting command to run); None when it is not, or when the set has no boxes."""
    boxes, labels = dataset_boxes(dataset, input_size)
    if not len(boxes):
        return None
    recall = float(np.mean(best_anchor_iou(boxes, anchor_grid(config, scales, ratios, input_size)) >= POSITIVE_IOU))
    if recall >= min_recall:
        return None
    return (f"the anchors reach IoU {POSITIVE_IOU:g} with only {recall:.1%} of the {len(boxes)} training boxes at "
            f"input {input_size} (best-possible recall {recall:.4f} < {min_recall:g}): the others are never "
            f"positives and will not be learned; fit anchors to this data with: {command}")
