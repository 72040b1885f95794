"""The official EfficientDet evaluation post-processing: top-k candidates and per-class gaussian soft-NMS.

Parameters from google/automl ``efficientdet``:

- ``hparams_config.py``: ``nms_configs = {'method': 'gaussian', 'iou_thresh': None, 'score_thresh': None
  (0. in some versions), 'sigma': None, 'max_output_size': 100}``; ``max_detection_points`` 5000 in
  ``nms_np.py`` (``MAX_DETECTION_POINTS``) and ``keras/postprocess.py`` (``topk_class_boxes``).
- ``nms_np.py`` ``soft_nms``: ``sigma = nms_configs['sigma'] or 0.5``, ``score_thresh = ... or 0.001``
  (so 0. also means 0.001), ``iou_thresh`` only for the linear/hard methods; per step the highest
  remaining score is kept and every other box's score is multiplied by ``exp(-iou**2 / sigma)``; boxes
  whose score falls below ``score_thresh`` are dropped. Areas and intersections use the legacy
  "+1" pixel convention ``(x2 - x1 + 1) * (y2 - y1 + 1)``.
- ``nms_np.py`` ``per_class_nms``: soft-NMS per class over the candidates, then the ``max_output_size``
  (100) highest scores over all classes.
- ``keras/postprocess.py`` ``topk_class_boxes``: the candidates are the top ``max_detection_points``
  (class, anchor) pairs of the flattened ``[N * num_classes]`` scores, each keeping its own class.

(The TF-op path of ``keras/postprocess.py`` calls ``tf.image.non_max_suppression_with_scores`` with
``soft_nms_sigma = sigma / 2`` because that op's weight is ``exp(-0.5 * iou**2 / soft_nms_sigma)``:
the same ``exp(-iou**2 / sigma)``.)

Boxes are decoded with :class:`efficientdet.anchors.BBoxTransform` and clipped like the rest of this
project (x to ``[0, W − 1]``, y to ``[0, H − 1]``) before the NMS.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor

from efficientdet.anchors import BBoxTransform

logger = logging.getLogger(__name__)

OFFICIAL_SIGMA = 0.5
OFFICIAL_SCORE_THRESHOLD = 0.001
OFFICIAL_MAX_CANDIDATES = 5000
OFFICIAL_MAX_DETECTIONS = 100


def pairwise_iou_plus_one(box: Tensor, boxes: Tensor) -> Tensor:
    """IoU of ``box`` Tensor[4] with ``boxes`` Tensor[K, 4], both (x1, y1, x2, y2), with the "+1" pixel
    convention of automl ``nms_np.py`` (a box from 0 to 9 is 10 pixels wide)."""
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    w = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0]) + 1).clamp(min=0)
    h = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1]) + 1).clamp(min=0)
    inter = w * h
    return inter / (area + areas - inter)


def soft_nms(boxes: Tensor, scores: Tensor, sigma: float = OFFICIAL_SIGMA,
             score_threshold: float = OFFICIAL_SCORE_THRESHOLD,
             max_output: int = OFFICIAL_MAX_DETECTIONS) -> Tuple[Tensor, Tensor]:
    """Gaussian soft-NMS of one class (automl ``nms_np.soft_nms`` with ``method='gaussian'``).

    Args:
        boxes: Tensor[K, 4] (x1, y1, x2, y2), input pixels.
        scores: Tensor[K].
        sigma: gaussian parameter: a box overlapping a kept one by ``iou`` has its score multiplied by
            ``exp(-iou**2 / sigma)`` (official 0.5).
        score_threshold: boxes whose (decayed) score drops below this are discarded (official 0.001).
        max_output: stop after this many kept boxes (later picks can only score lower).

    Returns:
        ``(keep, new_scores)``: LongTensor[M] indices into ``boxes`` in the order they were kept
        (descending new score) and Tensor[M] their decayed scores.

    Ties between equal scores go to the lower index.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be Tensor[K, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must be Tensor[{boxes.shape[0]}], got shape {tuple(scores.shape)}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    current = scores.clone()
    alive = current >= score_threshold
    keep: List[int] = []
    kept_scores: List[Tensor] = []
    neg_inf = torch.tensor(float("-inf"), dtype=current.dtype, device=current.device)
    while len(keep) < max_output and bool(alive.any()):
        masked = torch.where(alive, current, neg_inf)
        best = int(torch.argmax(masked))
        keep.append(best)
        kept_scores.append(current[best])
        alive[best] = False
        iou = pairwise_iou_plus_one(boxes[best], boxes)
        current = torch.where(alive, current * torch.exp(-(iou * iou) / sigma), current)
        alive &= current >= score_threshold
    index = torch.tensor(keep, dtype=torch.long, device=boxes.device)
    new_scores = torch.stack(kept_scores) if kept_scores else scores.new_zeros((0,))
    return index, new_scores


def _image_hw(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    if len(image_size) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def official_postprocess(regression: Tensor, classification: Tensor, anchors: Tensor,
                         image_size: Union[int, Sequence[int]],
                         max_candidates: int = OFFICIAL_MAX_CANDIDATES,
                         max_detections: int = OFFICIAL_MAX_DETECTIONS, sigma: float = OFFICIAL_SIGMA,
                         score_threshold: float = OFFICIAL_SCORE_THRESHOLD) -> List[Dict[str, Tensor]]:
    """Detections as the official evaluation makes them (see the module docstring for the sources).

    Args:
        regression: Tensor[B, N, 4] (dy, dx, dh, dw).
        classification: Tensor[B, N, C] sigmoid probabilities.
        anchors: Tensor[1 or B, N, 4] (y1, x1, y2, x2), input pixels.
        image_size: network input ``(height, width)`` (or one side), for clipping.
        max_candidates: (anchor, class) pairs kept before NMS, by score over all classes (5000).
        max_detections: detections kept per image (100).
        sigma: gaussian soft-NMS parameter (0.5).
        score_threshold: soft-NMS drops boxes whose score falls below this (0.001).

    Returns:
        Per image a dict: ``rois`` Tensor[M, 4] (x1, y1, x2, y2) input pixels, ``class_ids``
        LongTensor[M] (0-based, ``obj_list`` index), ``scores`` Tensor[M], by descending score, M ≤ max_detections.
    """
    _check_shapes(regression, classification, anchors)
    height, width = _image_hw(image_size)
    boxes = BBoxTransform()(anchors, regression)
    boxes = torch.stack((boxes[..., 0].clamp(0, width - 1), boxes[..., 1].clamp(0, height - 1),
                         boxes[..., 2].clamp(0, width - 1), boxes[..., 3].clamp(0, height - 1)), dim=-1)
    return [_image_detections(boxes[b], classification[b], max_candidates, max_detections, sigma, score_threshold)
            for b in range(regression.shape[0])]


def _check_shapes(regression: Tensor, classification: Tensor, anchors: Tensor) -> None:
    """Raise ValueError unless the shapes are those :func:`official_postprocess` documents."""
    if regression.dim() != 3 or regression.shape[-1] != 4:
        raise ValueError(f"regression must be Tensor[B, N, 4], got shape {tuple(regression.shape)}")
    if classification.dim() != 3 or classification.shape[:2] != regression.shape[:2]:
        raise ValueError(f"classification must be Tensor[B, N, C] with B, N of regression {tuple(regression.shape)}, "
                         f"got shape {tuple(classification.shape)}")
    if (anchors.dim() != 3 or anchors.shape[1] != regression.shape[1]
            or anchors.shape[0] not in (1, regression.shape[0])):
        raise ValueError(f"anchors must be Tensor[1 or B, N, 4] with N = {regression.shape[1]}, "
                         f"got shape {tuple(anchors.shape)}")


def _image_detections(boxes: Tensor, classification: Tensor, max_candidates: int, max_detections: int,
                      sigma: float, score_threshold: float) -> Dict[str, Tensor]:
    """One image's detections from its clipped boxes Tensor[N, 4] and scores Tensor[N, C]: top-k, soft-NMS."""
    num_classes = classification.shape[-1]
    flat = classification.reshape(-1)
    k = min(max_candidates, flat.shape[0])
    top_scores, top_index = torch.topk(flat, k, sorted=True)
    anchor_index = top_index // num_classes
    classes = top_index % num_classes
    cand_boxes = boxes[anchor_index]
    all_keep: List[Tensor] = []
    all_scores: List[Tensor] = []
    for cls in torch.unique(classes).tolist():
        members = torch.nonzero(classes == cls).squeeze(1)
        keep, new_scores = soft_nms(cand_boxes[members], top_scores[members], sigma, score_threshold,
                                    max_detections)
        all_keep.append(members[keep])
        all_scores.append(new_scores)
    if all_keep:
        keep = torch.cat(all_keep)
        scores = torch.cat(all_scores)
        order = torch.argsort(scores, descending=True, stable=True)[:max_detections]
        keep, scores = keep[order], scores[order]
    else:
        keep = top_index.new_zeros((0,))
        scores = top_scores.new_zeros((0,))
    return {"rois": cand_boxes[keep], "class_ids": classes[keep], "scores": scores}
