"""Non-maximum suppression with torchvision's semantics, torchvision optional.

``batched_nms`` uses ``torchvision.ops.batched_nms`` when torchvision can be imported and a pure-PyTorch
emulation otherwise that gives the same indices (the published post-processing calls torchvision):

- boxes are ``(x1, y1, x2, y2)``; a box's area is ``(x2 − x1) · (y2 − y1)`` without clamping (an inverted
  box has a negative area, a degenerate one zero);
- intersection ``max(0, min(x2) − max(x1)) · max(0, min(y2) − max(y1))``, IoU ``inter / (area_i + area_j − inter)``
  computed in the boxes' dtype, compared with the threshold in float64 as torchvision's CPU kernel does
  (an IoU of exactly ``float32(0.2)`` is > 0.2); 0 / 0 gives NaN, which never suppresses;
- boxes are visited in stable descending score order (ties keep their input order); a box is kept
  unless an earlier kept box overlaps it with IoU **>** ``iou_threshold``;
- class-aware as torchvision dispatches it: up to :data:`COORDINATE_TRICK_MAX_BOXES` boxes (CPU; 5000 on
  CUDA) the boxes are shifted by ``class · (max coordinate + 1)`` and suppressed in one pass (the same
  float operations here), above that classes are kept apart exactly (here: each kept box is compared with
  the later boxes of its own class only, the same result as torchvision's per-class loop);
- the kept indices come back sorted by descending score, ties in index order.

The pure-PyTorch path reproduces the CPU kernel. torchvision's CUDA kernel compares the IoU in float32,
so on CUDA the two can differ for an IoU of exactly ``float32(iou_threshold)``. The sequential part runs
on the CPU (boxes are copied there; the indices come back on the boxes' device).
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# torchvision.ops.batched_nms offsets coordinates per class up to this many boxes (numel 4000 on CPU,
# 20000 on CUDA) and runs a per-class loop above.
COORDINATE_TRICK_MAX_BOXES = 1000
COORDINATE_TRICK_MAX_BOXES_CUDA = 5000
# Up to this many boxes (single pass) the IoU of every pair is computed at once; above, row by row.
MATRIX_MAX_BOXES = 256

_TORCHVISION_BATCHED_NMS: Optional[Callable[..., Tensor]] = None
_TORCHVISION_CHECKED = False


def torchvision_batched_nms() -> Optional[Callable[..., Tensor]]:
    """``torchvision.ops.batched_nms`` if torchvision imports and works here, else None (checked once)."""
    global _TORCHVISION_BATCHED_NMS, _TORCHVISION_CHECKED
    if not _TORCHVISION_CHECKED:
        _TORCHVISION_CHECKED = True
        try:
            ops = importlib.import_module("torchvision.ops")
        except (ImportError, RuntimeError, OSError, AttributeError) as exc:
            # A missing package, or a torchvision built for another torch (its C++ ops fail to register).
            logger.debug("torchvision not usable (%s): pure-PyTorch NMS", exc)
        else:
            _TORCHVISION_BATCHED_NMS = ops.batched_nms
    return _TORCHVISION_BATCHED_NMS


def _check_inputs(boxes: Tensor, scores: Tensor, idxs: Optional[Tensor]) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be Tensor[K, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must be Tensor[K] with K = {boxes.shape[0]}, got shape {tuple(scores.shape)}")
    if idxs is not None and (idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]):
        raise ValueError(f"idxs must be Tensor[K] with K = {boxes.shape[0]}, got shape {tuple(idxs.shape)}")


def _threshold_in_dtype(iou_threshold: float, dtype: np.dtype) -> Optional[np.floating]:
    """The largest value ``t`` of ``dtype`` with ``t <= iou_threshold``: for x of that dtype, ``x > t`` equals
    the C++ kernel's ``double(x) > iou_threshold``. None for dtypes other than float32/64 (compare in float64)."""
    if dtype == np.float64:
        return np.float64(iou_threshold)
    if dtype != np.float32:
        return None
    value = np.float32(iou_threshold)
    if float(value) > iou_threshold:
        value = np.nextafter(value, np.float32(-np.inf))
    return value


def _suppress(boxes: Tensor, scores: Tensor, classes: Optional[Tensor], iou_threshold: float) -> Tensor:
    """torchvision's CPU NMS kernel: one vectorised step per kept box.

    The IoU arithmetic runs in numpy in the boxes' dtype; element-wise IEEE operations give the same bits
    as the C++ kernel. ``classes`` (Tensor[K] or None) keeps boxes of different classes from suppressing
    each other: boxes are then visited class by class (each class in stable descending score order, the
    same kept set as a global pass since classes do not interact) and a kept box is compared with the
    later boxes of its own class only. Returns Tensor[M] int64, by descending score, ties in index order.
    """
    num = boxes.shape[0]
    if num == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    if classes is not None:
        order = order[torch.sort(classes[order], stable=True).indices]
        sorted_classes = classes[order]
        # end[i]: one past the last box of box i's class in this order.
        ends = torch.searchsorted(sorted_classes, sorted_classes, right=True).cpu().numpy()
    else:
        ends = np.full(num, num, dtype=np.int64)
    sorted_boxes = boxes[order].detach().cpu().numpy()
    x1, y1, x2, y2 = (np.ascontiguousarray(sorted_boxes[:, k]) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    threshold = _threshold_in_dtype(float(iou_threshold), sorted_boxes.dtype)
    zero = sorted_boxes.dtype.type(0)
    suppressed = np.zeros(num, dtype=bool)

    def exceeds(iou: np.ndarray) -> np.ndarray:
        return iou.astype(np.float64) > float(iou_threshold) if threshold is None else iou > threshold

    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 = NaN never suppresses, as in C++
        if classes is None and num <= MATRIX_MAX_BOXES:
            # Every pair at once (the same element-wise operations, so the same IoU bits), then the sequential
            # pass over a boolean matrix: far fewer numpy calls for the few boxes of a confident model.
            width = np.maximum(zero, np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1))
            height = np.maximum(zero, np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1))
            inter = width * height
            overlaps = exceeds(inter / (areas[:, None] + areas - inter))
            for i in range(num - 1):
                if not suppressed[i]:
                    suppressed[i + 1:] |= overlaps[i, i + 1:]
        else:
            for i in range(num):
                if not suppressed[i] and ends[i] > i + 1:
                    later = slice(i + 1, int(ends[i]))
                    width = np.maximum(zero, np.minimum(x2[i], x2[later]) - np.maximum(x1[i], x1[later]))
                    height = np.maximum(zero, np.minimum(y2[i], y2[later]) - np.maximum(y1[i], y1[later]))
                    inter = width * height
                    suppressed[later] |= exceeds(inter / (areas[i] + areas[later] - inter))
    kept = torch.sort(order[torch.from_numpy(~suppressed).to(boxes.device)]).values
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


def nms_torch(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Pure-PyTorch single-class NMS, identical to ``torchvision.ops.nms`` (CPU kernel).

    Args:
        boxes: Tensor[K, 4] (x1, y1, x2, y2), any units, floating point.
        scores: Tensor[K].
        iou_threshold: suppress boxes whose IoU with a kept, higher-scored box is > this.

    Returns:
        Tensor[M] int64 indices into ``boxes`` of the kept boxes, by descending score (ties: input order).
    """
    _check_inputs(boxes, scores, None)
    return _suppress(boxes, scores, None, iou_threshold)


def batched_nms_torch(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Pure-PyTorch class-aware NMS, identical to ``torchvision.ops.batched_nms`` (see the module doc).

    Args:
        boxes: Tensor[K, 4] (x1, y1, x2, y2), floating point.
        scores: Tensor[K].
        idxs: Tensor[K] integer class of each box.
        iou_threshold: suppress IoU > this.

    Returns:
        Tensor[M] int64 indices into ``boxes`` of the kept boxes, by descending score (ties: input order).
    """
    _check_inputs(boxes, scores, idxs)
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    limit = COORDINATE_TRICK_MAX_BOXES if boxes.device.type == "cpu" else COORDINATE_TRICK_MAX_BOXES_CUDA
    if boxes.shape[0] > limit:
        return _suppress(boxes, scores, idxs, iou_threshold)
    # torchvision's coordinate trick, with its exact float operations (max + 1 in the boxes' dtype).
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return _suppress(boxes + offsets[:, None], scores, None, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Class-aware NMS: boxes of different classes (``idxs``) never suppress each other.

    Args:
        boxes: Tensor[K, 4] (x1, y1, x2, y2), floating point.
        scores: Tensor[K].
        idxs: Tensor[K] integer class index of each box.
        iou_threshold: suppress IoU > this.

    Returns:
        Tensor[M] int64 indices of the kept boxes, by descending score. Uses torchvision when importable.
    """
    _check_inputs(boxes, scores, idxs)
    tv_nms = torchvision_batched_nms()
    if tv_nms is not None:
        keep = torch.sort(tv_nms(boxes, scores, idxs, float(iou_threshold))).values
        # torchvision's per-class path re-sorts with an unstable sort: order ties by index, as the
        # single-pass path (and the pure-PyTorch one) does.
        return keep[torch.sort(scores[keep], descending=True, stable=True).indices]
    return batched_nms_torch(boxes, scores, idxs, iou_threshold)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Single-class NMS; same arguments and result as :func:`batched_nms` without ``idxs``."""
    _check_inputs(boxes, scores, None)
    tv_nms = torchvision_batched_nms()
    if tv_nms is not None:
        idxs = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
        return batched_nms(boxes, scores, idxs, iou_threshold)
    return nms_torch(boxes, scores, iou_threshold)
