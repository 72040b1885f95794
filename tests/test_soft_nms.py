"""utils/inference/soft_nms.py against written-out references of automl's ``nms_np`` gaussian soft-NMS: a torch
loop (the same float operations, so exact equality) and a brute-force numpy float64 one."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from torch import Tensor

from efficientdet.anchors import Anchors
from utils.inference.soft_nms import batched_soft_nms, official_postprocess, soft_nms


def torch_reference_soft_nms(boxes: Tensor, scores: Tensor, sigma: float = 0.5, threshold: float = 0.001,
                             max_output: int = 100) -> Tuple[Tensor, Tensor]:
    """The published loop, one box per step over every box: keep the highest alive score (ties: lowest index),
    multiply every other alive score by exp(-iou**2 / sigma), "+1" pixel areas, drop scores under threshold."""
    current = scores.clone()
    alive = current >= threshold
    keep, kept = [], []
    while len(keep) < max_output and bool(alive.any()):
        best = int(torch.argmax(torch.where(alive, current, torch.tensor(float("-inf"), dtype=current.dtype))))
        keep.append(best)
        kept.append(current[best])
        alive[best] = False
        b = boxes[best]
        w = (torch.minimum(b[2], boxes[:, 2]) - torch.maximum(b[0], boxes[:, 0]) + 1).clamp(min=0)
        h = (torch.minimum(b[3], boxes[:, 3]) - torch.maximum(b[1], boxes[:, 1]) + 1).clamp(min=0)
        inter = w * h
        area = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
        areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
        iou = inter / (area + areas - inter)
        current = torch.where(alive, current * torch.exp(-(iou * iou) / sigma), current)
        alive &= current >= threshold
    return torch.tensor(keep, dtype=torch.long), torch.stack(kept) if kept else scores.new_zeros((0,))


def torch_reference_per_class(boxes: Tensor, scores: Tensor, classes: Tensor, max_output: int = 100,
                              **kwargs) -> Tuple[Tensor, Tensor]:
    """Soft-NMS of each class alone (ascending class), then the max_output best over all (stable: ties keep
    class order, then pick order)."""
    all_keep, all_scores = [torch.zeros(0, dtype=torch.long)], [scores.new_zeros((0,))]
    for cls in torch.unique(classes).tolist():
        members = torch.nonzero(classes == cls).squeeze(1)
        keep, kept = torch_reference_soft_nms(boxes[members], scores[members], max_output=max_output, **kwargs)
        all_keep.append(members[keep])
        all_scores.append(kept)
    keep, kept = torch.cat(all_keep), torch.cat(all_scores)
    order = torch.argsort(kept, descending=True, stable=True)[:max_output]
    return keep[order], kept[order]


def make_candidates(seed: int, count: int, num_classes: int, size: float = 256.0,
                    dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor, Tensor]:
    """Boxes jittered around a few objects (clusters of overlapping boxes), some on whole pixels, 5 % zero-width,
    5 % copies of another box; classes skewed towards the first ones; long-tailed scores (some under 0.001),
    30 % rounded to sixteenths (exact ties, within and across classes)."""
    g = torch.Generator().manual_seed(seed)
    objects = max(2, count // 50)
    centre = torch.rand(objects, 2, generator=g, dtype=torch.float64) * size
    half = 4 + torch.rand(objects, 2, generator=g, dtype=torch.float64) * size / 4
    owner = torch.randint(objects, (count,), generator=g)
    jitter = torch.randn(count, 4, generator=g, dtype=torch.float64) * 0.15 * half[owner].repeat(1, 2)
    boxes = (torch.cat([centre[owner] - half[owner], centre[owner] + half[owner]], 1) + jitter).clamp(0, size - 1)
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    boxes = torch.where(torch.rand(count, 1, generator=g) < 0.3, boxes.round(), boxes)
    flat = torch.rand(count, generator=g) < 0.05
    boxes[flat, 2] = boxes[flat, 0]
    copies = torch.nonzero(torch.rand(count, generator=g) < 0.05).squeeze(1)
    boxes[copies] = boxes[torch.randint(count, (copies.numel(),), generator=g)]
    skewed = (num_classes * torch.rand(count, generator=g) ** 2).long()
    classes = torch.where(torch.rand(count, generator=g) < 0.7, owner % num_classes, skewed)
    scores = torch.rand(count, generator=g, dtype=torch.float64) ** 4
    tie = torch.rand(count, generator=g) < 0.3
    scores[tie] = (scores[tie] * 16).round() / 16
    return boxes.to(dtype), scores.to(dtype), classes


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


@pytest.mark.parametrize("seed, count, dtype", [(0, 300, torch.float32), (1, 200, torch.float64)])
def test_soft_nms_equals_written_out_loop(seed, count, dtype):
    """One class of clustered, tied and degenerate boxes: the same picks and bit-identical scores as the loop."""
    boxes, scores, _ = make_candidates(seed, count, 1, dtype=dtype)
    for max_output in (100, count):
        keep, new_scores = soft_nms(boxes, scores, max_output=max_output)
        ref_keep, ref_scores = torch_reference_soft_nms(boxes, scores, max_output=max_output)
        assert torch.equal(keep, ref_keep) and torch.equal(new_scores, ref_scores)
        assert new_scores.dtype == dtype


@pytest.mark.parametrize("seed, count, num_classes, dtype", [(2, 600, 8, torch.float32), (3, 400, 5, torch.float64),
                                                             (4, 300, 1, torch.float32), (5, 500, 30, torch.float32)])
def test_batched_soft_nms_equals_per_class_loop(seed, count, num_classes, dtype):
    """Per-class soft-NMS then the 100 best (stable): the same boxes, order and bit-identical scores."""
    boxes, scores, classes = make_candidates(seed, count, num_classes, dtype=dtype)
    keep, new_scores = batched_soft_nms(boxes, scores, classes)
    ref_keep, ref_scores = torch_reference_per_class(boxes, scores, classes)
    assert 0 < keep.numel() <= 100
    assert torch.equal(keep, ref_keep) and torch.equal(new_scores, ref_scores)


def test_batched_soft_nms_other_parameters_and_ties():
    boxes, scores, classes = make_candidates(6, 400, 6)
    saw_ties = False
    for sigma, threshold, max_output in [(0.1, 0.001, 100), (2.0, 0.0, 1000), (0.5, 0.3, 100), (0.5, 0.001, 7)]:
        keep, new_scores = batched_soft_nms(boxes, scores, classes, sigma, threshold, max_output)
        ref_keep, ref_scores = torch_reference_per_class(boxes, scores, classes, max_output=max_output, sigma=sigma,
                                                         threshold=threshold)
        assert torch.equal(keep, ref_keep) and torch.equal(new_scores, ref_scores), (sigma, threshold, max_output)
        saw_ties |= bool((new_scores[1:] == new_scores[:-1]).any())
    assert saw_ties  # equal kept scores occur, so the tie order is exercised


def test_batched_soft_nms_edge_cases():
    empty = batched_soft_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert empty[0].shape == (0,) and empty[1].shape == (0,)
    keep, new_scores = batched_soft_nms(torch.tensor([[1.0, 2.0, 5.0, 9.0]]), torch.tensor([0.4]), torch.tensor([3]))
    assert keep.tolist() == [0] and new_scores.tolist() == [pytest.approx(0.4)]
    below = batched_soft_nms(torch.rand(5, 4), torch.full((5,), 0.0005), torch.zeros(5, dtype=torch.long))
    assert below[0].numel() == 0
    assert batched_soft_nms(torch.rand(5, 4), torch.rand(5), torch.zeros(5, dtype=torch.long), max_output=0)[0].numel() == 0
    with pytest.raises(ValueError, match="classes"):
        batched_soft_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, dtype=torch.long))


def test_batched_soft_nms_same_scores_and_identical_boxes():
    """Class 1: four copies of one box (IoU 1: each pick decays the rest by exp(-1 / 0.5)) and a lone box at 0.5;
    class 0: three disjoint boxes, all at 0.5 (kept in index order, undecayed). Equal scores: class 0 first."""
    same = [[10.0, 10.0, 29.0, 29.0]] * 4
    disjoint = [[0.0, 0.0, 4.0, 4.0], [50.0, 50.0, 60.0, 60.0], [100.0, 0.0, 120.0, 9.0], [200.0, 200.0, 210.0, 210.0]]
    boxes = torch.tensor(same + disjoint)
    scores = torch.tensor([0.5, 0.8, 0.6, 0.9, 0.5, 0.5, 0.5, 0.5])
    classes = torch.tensor([1, 1, 1, 1, 0, 0, 0, 1])
    keep, new_scores = batched_soft_nms(boxes, scores, classes)
    assert keep.tolist() == [3, 4, 5, 6, 7, 1, 2, 0]
    e = np.exp(-2.0)
    expected = [0.9, 0.5, 0.5, 0.5, 0.5, 0.8 * e, 0.6 * e ** 2, 0.5 * e ** 3]  # the last just above 0.001
    np.testing.assert_allclose(new_scores.numpy(), expected, rtol=1e-6)
    ref_keep, ref_scores = torch_reference_per_class(boxes, scores, classes)
    assert torch.equal(keep, ref_keep) and torch.equal(new_scores, ref_scores)


def test_soft_nms_keeps_the_thread_count():
    threads = torch.get_num_threads()
    boxes, scores, classes = make_candidates(7, 100, 3)
    batched_soft_nms(boxes, scores, classes)
    soft_nms(boxes, scores)
    assert torch.get_num_threads() == threads


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


def test_benchmark_script_checks_equality(capsys):
    from benchmark import soft_nms as bench

    assert bench.main(bench.parse_args(["--images", "1", "--candidates", "300", "--classes", "5", "--repeats", "1"])) == 0
    out = capsys.readouterr().out
    assert "identical output (boxes, order, scores): 1/1 images" in out and "ms/image" in out
