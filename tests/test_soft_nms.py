"""utils/inference/soft_nms.py against a brute-force numpy reference of automl's ``nms_np`` gaussian soft-NMS."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from efficientdet.anchors import Anchors
from utils.inference.soft_nms import official_postprocess, soft_nms


def reference_soft_nms(boxes: np.ndarray, scores: np.ndarray, sigma: float = 0.5,
                       threshold: float = 0.001) -> Tuple[List[int], List[float]]:
    """Pick the highest score, decay the rest by exp(-iou²/sigma) with "+1" areas, drop < threshold (float64)."""
    scores = scores.astype(np.float64).copy()
    boxes = boxes.astype(np.float64)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    alive = np.nonzero(scores >= threshold)[0]
    keep, kept = [], []
    while alive.size:
        best = int(alive[np.argmax(scores[alive])])  # first maximum: lowest index among ties
        keep.append(best)
        kept.append(float(scores[best]))
        alive = alive[alive != best]
        w = np.maximum(np.minimum(boxes[best, 2], boxes[alive, 2]) - np.maximum(boxes[best, 0], boxes[alive, 0]) + 1, 0)
        h = np.maximum(np.minimum(boxes[best, 3], boxes[alive, 3]) - np.maximum(boxes[best, 1], boxes[alive, 1]) + 1, 0)
        inter = w * h
        iou = inter / (areas[best] + areas[alive] - inter)
        scores[alive] *= np.exp(-(iou ** 2) / sigma)
        alive = alive[scores[alive] >= threshold]
    return keep, kept


def reference_postprocess(regression: np.ndarray, classification: np.ndarray, anchors: np.ndarray,
                          height: int, width: int, k: int = 5000, max_det: int = 100) -> Dict[str, np.ndarray]:
    """One image: top-k (anchor, class) scores, decode, clip, full soft-NMS per class, best max_det."""
    num_classes = classification.shape[1]
    flat = classification.reshape(-1).astype(np.float64)
    top = np.argsort(-flat, kind="stable")[:k]
    anchor_idx, classes = top // num_classes, top % num_classes
    a = anchors[anchor_idx].astype(np.float64)
    r = regression[anchor_idx].astype(np.float64)
    ya, xa = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
    ha, wa = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    h, w = np.exp(r[:, 2]) * ha, np.exp(r[:, 3]) * wa
    yc, xc = r[:, 0] * ha + ya, r[:, 1] * wa + xa
    boxes = np.stack([np.clip(xc - w / 2, 0, width - 1), np.clip(yc - h / 2, 0, height - 1),
                      np.clip(xc + w / 2, 0, width - 1), np.clip(yc + h / 2, 0, height - 1)], 1)
    rows = []
    for c in range(num_classes):
        members = np.nonzero(classes == c)[0]
        keep, kept = reference_soft_nms(boxes[members], flat[top][members])
        rows += [(s, members[i]) for i, s in zip(keep, kept)]
    rows.sort(key=lambda t: -t[0])
    rows = rows[:max_det]
    index = np.array([i for _, i in rows], dtype=np.int64)
    return {"rois": boxes[index], "class_ids": classes[index], "scores": np.array([s for s, _ in rows])}


def _random_boxes(rng: np.random.Generator, count: int, size: float = 100.0) -> np.ndarray:
    xy = rng.uniform(0, size, (count, 2))
    wh = rng.uniform(5, 40, (count, 2))
    return np.concatenate([xy, xy + wh], 1)


def test_soft_nms_matches_reference():
    rng = np.random.default_rng(0)
    boxes = _random_boxes(rng, 60)
    scores = rng.uniform(0, 1, 60)
    keep, new_scores = soft_nms(torch.from_numpy(boxes), torch.from_numpy(scores), max_output=1000)
    ref_keep, ref_scores = reference_soft_nms(boxes, scores)
    assert keep.tolist() == ref_keep
    np.testing.assert_allclose(new_scores.numpy(), ref_scores, rtol=1e-12)
    assert (np.diff(new_scores.numpy()) <= 0).all()


def test_soft_nms_decays_overlaps_instead_of_removing_them():
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 4.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep, new_scores = soft_nms(boxes, scores, sigma=0.5)
    # Box 1 is half of box 0 ("+1" areas: 50 / 100): its score is 0.8 * exp(-0.25 / 0.5).
    assert keep.tolist() == [0, 2, 1]
    np.testing.assert_allclose(new_scores.numpy(), [0.9, 0.7, 0.8 * np.exp(-0.5)], rtol=1e-6)
    keep, _ = soft_nms(boxes, scores, score_threshold=0.75)
    assert keep.tolist() == [0]  # 0.7 is below the threshold, box 1 decays below it
    keep, _ = soft_nms(boxes, scores, max_output=2)
    assert keep.tolist() == [0, 2]


def test_soft_nms_bad_input():
    with pytest.raises(ValueError, match="boxes"):
        soft_nms(torch.zeros(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="scores"):
        soft_nms(torch.zeros(3, 4), torch.zeros(2))
    keep, scores = soft_nms(torch.zeros(0, 4), torch.zeros(0))
    assert keep.shape == (0,) and scores.shape == (0,)


@pytest.mark.parametrize("max_candidates", [5000, 300])
def test_official_postprocess_matches_reference(max_candidates):
    rng = np.random.default_rng(1)
    height, width, num_classes = 128, 256, 6
    anchors = Anchors(4.0, (3, 4, 5, 6, 7)).generate(height, width).numpy()  # [N, 4] (y1, x1, y2, x2)
    count = anchors.shape[0]
    regression = rng.normal(0, 0.3, (2, count, 4))
    # Few confident scores, many tiny ones: some classes have several candidates, low ones fall under 0.001.
    classification = rng.uniform(0, 1, (2, count, num_classes)) ** 12
    results = official_postprocess(torch.from_numpy(regression), torch.from_numpy(classification),
                                   torch.from_numpy(anchors)[None], (height, width), max_candidates=max_candidates)
    assert len(results) == 2
    for b, result in enumerate(results):
        ref = reference_postprocess(regression[b], classification[b], anchors, height, width, k=max_candidates)
        assert result["scores"].shape[0] == 100 == ref["scores"].shape[0]
        np.testing.assert_allclose(result["scores"].numpy(), ref["scores"], rtol=1e-9)
        np.testing.assert_array_equal(result["class_ids"].numpy(), ref["class_ids"])
        np.testing.assert_allclose(result["rois"].numpy(), ref["rois"], rtol=0, atol=1e-9)
        rois = result["rois"].numpy()
        assert rois[:, [0, 2]].max() <= width - 1 and rois[:, [1, 3]].max() <= height - 1 and rois.min() >= 0


def test_official_postprocess_few_candidates_and_shapes():
    anchors = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]]])
    regression = torch.zeros(1, 3, 4)
    classification = torch.tensor([[[0.9, 0.1], [0.8, 0.0], [0.0005, 0.3]]])
    (result,) = official_postprocess(regression, classification, anchors, 64)
    # Anchors 0 and 1 coincide: class 0 keeps both, the second decayed by exp(-1 / 0.5).
    assert result["class_ids"].tolist() == [0, 1, 0, 1]
    np.testing.assert_allclose(result["scores"].numpy(), [0.9, 0.3, 0.8 * np.exp(-2.0), 0.1], rtol=1e-6)
    assert result["rois"][1].tolist() == [20.0, 20.0, 40.0, 40.0]
    with pytest.raises(ValueError, match="classification"):
        official_postprocess(regression, classification[:, :2], anchors, 64)
