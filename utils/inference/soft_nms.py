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

import contextlib
import logging
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from efficientdet.anchors import BBoxTransform

logger = logging.getLogger(__name__)

OFFICIAL_SIGMA = 0.5
OFFICIAL_SCORE_THRESHOLD = 0.001
OFFICIAL_MAX_CANDIDATES = 5000
OFFICIAL_MAX_DETECTIONS = 100


def _check_soft_nms_args(boxes: Tensor, scores: Tensor, sigma: float, score_threshold: float) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be Tensor[K, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must be Tensor[{boxes.shape[0]}], got shape {tuple(scores.shape)}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if score_threshold == float("-inf"):
        raise ValueError("score_threshold must be above -inf (-inf marks discarded boxes)")


def _soft_nms_steps(boxes: Tensor, scores: Tensor, segments: Optional[Tuple[List[int], List[int]]], sigma: float,
                    score_threshold: float, max_output: int) -> Tuple[List[int], List[float]]:
    """The gaussian soft-NMS loop over boxes Tensor[K, 4] (x1, y1, x2, y2) and scores Tensor[K] in the working dtype.

    ``segments`` is ``(start, end)`` per box: the slice of boxes of its class (classes contiguous), or None for one
    class. One step keeps the highest alive score over all classes (ties: lowest index, i.e. lowest class, then
    lowest index within it) and decays only its own class, so the picks come in the order of a merge of the
    per-class runs by descending score. Each alive score is multiplied by the same float32/64 operations, in the
    same order, as a one-class-at-a-time loop over all boxes would: the results are bit-identical to it.
    Discarded boxes hold -inf (``-inf * decay`` stays -inf or NaN, never alive again).
    """
    if scores.numel() == 0:
        return [], []
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    masked = torch.where(scores >= score_threshold, scores, neg_inf)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    low, high = boxes[:, :2], boxes[:, 2:]
    keep: List[int] = []
    kept: List[float] = []
    while len(keep) < max_output:
        best = int(torch.argmax(masked))
        score = float(masked[best])
        if score == float("-inf"):
            break  # every remaining score is under the threshold
        keep.append(best)
        kept.append(score)
        masked[best] = neg_inf
        start, end = (segments[0][best], segments[1][best]) if segments is not None else (0, masked.shape[0])
        box = boxes[best]
        # (min(x2) - max(x1) + 1).clamp(0) for x and y at once, then w * h: the "+1" intersection.
        wh = (torch.minimum(box[2:], high[start:end]) - torch.maximum(box[:2], low[start:end]) + 1).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        iou = inter / (areas[best] + areas[start:end] - inter)
        decayed = masked[start:end] * torch.exp(-(iou * iou) / sigma)
        torch.where(decayed >= score_threshold, decayed, neg_inf, out=masked[start:end])
    return keep, kept


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU while the loop runs: its tensors are small, and with several threads
    ``torch.exp`` (torch 2.13 CPU wheel) enters a parallel region even for a few hundred elements, which stalls for
    milliseconds per call when the cores are busy. Every operation is element-wise, so the values do not depend
    on the thread count."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _working_dtype(boxes: Tensor, scores: Tensor) -> torch.dtype:
    """The dtype decayed scores are computed in: scores' dtype promoted with the IoU's (the boxes' if floating)."""
    iou_dtype = boxes.dtype if boxes.is_floating_point() else torch.get_default_dtype()
    return torch.promote_types(scores.dtype, iou_dtype)


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
        (descending new score) and Tensor[M] their decayed scores (dtype of ``scores`` promoted with the boxes').

    Ties between equal scores go to the lower index. Each step computes the IoU of the kept box with the
    alive boxes only and stops as soon as every remaining score is under ``score_threshold``.
    """
    _check_soft_nms_args(boxes, scores, sigma, score_threshold)
    dtype = _working_dtype(boxes, scores)
    with torch.no_grad(), _one_thread(scores.device):
        keep, kept = _soft_nms_steps(boxes.detach(), scores.detach().to(dtype), None, sigma,
                                     score_threshold, max_output)
    return (torch.tensor(keep, dtype=torch.long, device=boxes.device),
            torch.tensor(kept, dtype=dtype, device=scores.device))


def batched_soft_nms(boxes: Tensor, scores: Tensor, classes: Tensor, sigma: float = OFFICIAL_SIGMA,
                     score_threshold: float = OFFICIAL_SCORE_THRESHOLD,
                     max_output: int = OFFICIAL_MAX_DETECTIONS) -> Tuple[Tensor, Tensor]:
    """:func:`soft_nms` of each class, then the ``max_output`` highest decayed scores over all classes
    (automl ``nms_np.per_class_nms``).

    Args:
        boxes: Tensor[K, 4] (x1, y1, x2, y2), input pixels.
        scores: Tensor[K].
        classes: LongTensor[K] class of each box.
        sigma, score_threshold: as :func:`soft_nms`.
        max_output: boxes kept over all classes.

    Returns:
        ``(keep, new_scores)``: LongTensor[M] indices into ``boxes`` by descending new score (ties: lower class
        first, then the order that class kept them) and Tensor[M] their decayed scores, M ≤ max_output: the same
        as running :func:`soft_nms` on each class and sorting the union stably. A kept box's class decays alone,
        so at most ``max_output`` steps run in all.
    """
    _check_soft_nms_args(boxes, scores, sigma, score_threshold)
    if classes.shape != scores.shape:
        raise ValueError(f"classes must be Tensor[{scores.shape[0]}], got shape {tuple(classes.shape)}")
    dtype = _working_dtype(boxes, scores)
    with torch.no_grad(), _one_thread(scores.device):
        order = torch.argsort(classes, stable=True)  # classes contiguous, each in input order
        _, counts = torch.unique_consecutive(classes[order], return_counts=True)
        ends = torch.cumsum(counts, 0)
        starts = torch.repeat_interleave(ends - counts, counts).tolist()
        ends = torch.repeat_interleave(ends, counts).tolist()
        keep, kept = _soft_nms_steps(boxes.detach()[order], scores.detach()[order].to(dtype), (starts, ends),
                                     sigma, score_threshold, max_output)
    keep_index = torch.tensor(keep, dtype=torch.long, device=order.device)
    return order[keep_index], torch.tensor(kept, dtype=dtype, device=scores.device)


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
    keep, scores = batched_soft_nms(cand_boxes, top_scores, classes, sigma, score_threshold, max_detections)
    return {"rois": cand_boxes[keep], "class_ids": classes[keep], "scores": scores}
