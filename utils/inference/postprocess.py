"""Post-processing of the network outputs into detections (the published rules), batched.

Decode the regression against the anchors (:class:`efficientdet.anchors.BBoxTransform`), clip to the
network input (:class:`efficientdet.anchors.ClipBoxes`), score = max over classes, keep anchors with
score **>** threshold, class-aware NMS (:func:`utils.inference.nms.batched_nms`, IoU **>** iou_threshold suppresses),
result ordered by descending score. Everything runs in float32, whatever the network's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from efficientdet.anchors import BBoxTransform, ClipBoxes
from utils.inference.nms import batched_nms



@dataclass(frozen=True)
class Thresholds:
    """A score threshold (keep score > ``score``) and an NMS IoU threshold (suppress IoU > ``iou``)."""

    score: float
    iou: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.score < 1.0:
            raise ValueError(f"score threshold must be in [0, 1), got {self.score}")
        if not 0.0 < self.iou <= 1.0:
            raise ValueError(f"NMS IoU threshold must be in (0, 1], got {self.iou}")


#: The named presets (the published values): the demo and video scripts, COCO evaluation (also
#: ``train.py --val_map``), and the ``--debug`` training images.
DEMO_THRESHOLDS = Thresholds(score=0.2, iou=0.2)
EVAL_THRESHOLDS = Thresholds(score=0.05, iou=0.5)
DEBUG_THRESHOLDS = Thresholds(score=0.5, iou=0.3)

_REGRESS = BBoxTransform()
_CLIP = ClipBoxes()


@dataclass
class Detections:
    """Detections of one image, ordered by descending score.

    Attributes:
        boxes: ``np.ndarray[K, 4]`` float32 ``(x1, y1, x2, y2)``: network-input pixels straight out of
            :func:`postprocess`, ORIGINAL image pixels out of :class:`utils.inference.detector.Detector`.
        class_ids: ``np.ndarray[K]`` int64, index into the project's ``obj_list``.
        scores: ``np.ndarray[K]`` float32, the class probability.
        class_names: ``obj_list[class_id]`` per detection (empty strings when unknown).
    """

    boxes: np.ndarray
    class_ids: np.ndarray
    scores: np.ndarray
    class_names: List[str]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32), [])


def _check_outputs(regression: Tensor, classification: Tensor, anchors: Tensor) -> None:
    if regression.dim() != 3 or regression.shape[2] != 4:
        raise ValueError(f"regression must be Tensor[B, N, 4], got shape {tuple(regression.shape)}")
    if classification.dim() != 3 or classification.shape[:2] != regression.shape[:2]:
        raise ValueError(f"classification must be Tensor[B, N, C] with B, N = {tuple(regression.shape[:2])}, "
                         f"got shape {tuple(classification.shape)}")
    if (anchors.dim() != 3 or anchors.shape[0] not in (1, regression.shape[0])
            or anchors.shape[1:] != regression.shape[1:]):
        raise ValueError(f"anchors must be Tensor[1 or B, N, 4] with N = {regression.shape[1]}, "
                         f"got shape {tuple(anchors.shape)}")


# Rows per group in :func:`_rows_above` (the first that divides the row count): a maximum over the 16 × C
# values of a group vectorises far better than 16 row maxima over C = 90 (0.11 ms instead of 1.06 ms for
# D0's 49104 × 90 on the 2-core reference CPU).
_GROUP_SIZES = (16, 9, 8, 4, 3, 2)


def _rows_above(flat: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    """The rows of ``flat`` (Tensor[M, C], any float dtype) whose maximum is > ``threshold``, compared in
    float32: ``(indices Tensor[K] ascending, rows Tensor[K, C] float32)``, the indices being
    ``nonzero(flat.float().amax(1) > threshold)``.

    Rows are first screened in groups (a row can pass only if its group's maximum does); only the rows of
    passing groups get their own maximum. When most groups pass (an unconfident model), all rows do.
    """
    num_rows, columns = flat.shape
    group = next((g for g in _GROUP_SIZES if num_rows % g == 0), 1)
    if group > 1:
        if flat.element_size() == 2 and threshold >= 0.0:
            # bfloat16 / float16: a non-negative value's bit pattern, read as int16, orders like the value
            # (negative values read as negative ints), and an int16 maximum is ~5x faster on CPU than a
            # bfloat16 one. Screened against the largest value of the dtype <= threshold: for a value v of
            # that dtype, v > threshold exactly when v's bits are above it. NaN's bits pass the screen.
            limit = torch.tensor(threshold, dtype=torch.float32).to(flat.dtype)
            limit_bits = int(limit.view(torch.int16)) - int(float(limit) > threshold)
            group_best = flat.view(torch.int16).reshape(num_rows // group, group * columns).amax(dim=1)
            groups = torch.nonzero(group_best > limit_bits).squeeze(1)
        else:
            group_best = flat.reshape(num_rows // group, group * columns).amax(dim=1).float()
            # A NaN hides its group's maximum: such groups are checked row by row.
            groups = torch.nonzero((group_best > threshold) | group_best.isnan()).squeeze(1)
        if groups.numel() * 4 <= group_best.numel():
            candidates = (groups[:, None] * group + torch.arange(group, device=flat.device)).reshape(-1)
            rows = flat[candidates].float()
            above = rows.amax(dim=1) > threshold
            return candidates[above], rows[above]
    indices = torch.nonzero(flat.float().amax(dim=1) > threshold).squeeze(1)
    return indices, flat[indices].float()


def postprocess_tensors(input_hw: Tuple[int, int], anchors: Tensor, regression: Tensor, classification: Tensor,
                        threshold: float, iou_threshold: float) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Network outputs -> per image ``(boxes Tensor[K, 4] (x1, y1, x2, y2) input pixels float32,
    class_ids Tensor[K] int64, scores Tensor[K] float32)`` on the outputs' device, by descending score.

    Args:
        input_hw: (H, W) of the network input (the clipping range).
        anchors: Tensor[1 or B, N, 4] (y1, x1, y2, x2), input pixels.
        regression: Tensor[B, N, 4] (dy, dx, dh, dw).
        classification: Tensor[B, N, C], sigmoid probabilities.
        threshold: keep anchors whose best class probability is > this.
        iou_threshold: class-aware NMS suppresses IoU > this.
    """
    _check_outputs(regression, classification, anchors)
    batch_size, num_anchors, num_classes = classification.shape
    height, width = int(input_hw[0]), int(input_hw[1])
    # Threshold first, then decode only the anchors that pass (the same numbers as decoding all of them:
    # every step is element-wise). The class index is taken on the few selected rows only.
    flat_index, rows = _rows_above(classification.reshape(-1, num_classes), threshold)  # b * N + n, ascending
    scores, classes = rows.max(dim=1)
    if batch_size == 1:
        selected_anchors = anchors[0, flat_index].float()
        counts = [int(flat_index.shape[0])]
    else:
        image_index = torch.div(flat_index, num_anchors, rounding_mode="floor")
        anchor_index = flat_index - image_index * num_anchors
        selected_anchors = anchors.float()[image_index if anchors.shape[0] > 1 else torch.zeros_like(image_index),
                                           anchor_index]
        counts = torch.bincount(image_index, minlength=batch_size).tolist()
    selected_regression = regression.reshape(-1, 4)[flat_index].float()
    # ClipBoxes only reads the last two dimensions of its reference tensor.
    reference = selected_regression.new_empty((0, 0, height, width))
    boxes = _CLIP(_REGRESS(selected_anchors[None], selected_regression[None]), reference)[0]
    results = []
    # One NMS per image (the published per-image call; its sequential part is per kept box anyway).
    for boxes_b, scores_b, classes_b in zip(boxes.split(counts), scores.split(counts), classes.split(counts)):
        keep = batched_nms(boxes_b, scores_b, classes_b, iou_threshold)
        results.append((boxes_b[keep], classes_b[keep].to(torch.int64), scores_b[keep]))
    return results


def postprocess(input_hw: Tuple[int, int], anchors: Tensor, regression: Tensor, classification: Tensor,
                threshold: float, iou_threshold: float, obj_list: Sequence[str] = ()) -> List[Detections]:
    """Like :func:`postprocess_tensors`, as one :class:`Detections` (numpy, network-input pixels) per image.

    ``obj_list`` gives ``class_names``; a class id beyond it is a ValueError (model/project mismatch).
    """
    results = []
    for boxes, class_ids, scores in postprocess_tensors(input_hw, anchors, regression, classification,
                                                        threshold, iou_threshold):
        ids = class_ids.cpu().numpy()
        if obj_list:
            if ids.size and int(ids.max()) >= len(obj_list):
                raise ValueError(f"class id {int(ids.max())} is outside obj_list ({len(obj_list)} names): "
                                 "the model and the project YAML disagree on the classes")
            names = [obj_list[i] for i in ids.tolist()]
        else:
            names = [""] * len(ids)
        results.append(Detections(boxes=boxes.cpu().numpy().astype(np.float32), class_ids=ids.astype(np.int64),
                                  scores=scores.cpu().numpy().astype(np.float32), class_names=names))
    return results
