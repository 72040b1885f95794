"""NMS: the pure-PyTorch path against a brute-force transcription of torchvision's CPU kernel, and against
torchvision itself where it imports."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from utils.inference import nms as nms_module
from utils.inference.nms import COORDINATE_TRICK_MAX_BOXES, batched_nms, batched_nms_torch, nms, nms_torch


def reference_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list:
    """torchvision's nms_kernel_impl, one pair at a time in float32 scalars, compared as doubles."""
    boxes = boxes.astype(np.float32)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    order = sorted(range(len(scores)), key=lambda k: -float(scores[k]))  # Python's sort is stable
    suppressed = [False] * len(scores)
    keep = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for pos, i in enumerate(order):
            if not suppressed[i]:
                keep.append(i)
                for j in order[pos + 1:]:
                    if not suppressed[j]:
                        w = max(np.float32(0), min(x2[i], x2[j]) - max(x1[i], x1[j]))
                        h = max(np.float32(0), min(y2[i], y2[j]) - max(y1[i], y1[j]))
                        inter = np.float32(w * h)
                        ovr = inter / (areas[i] + areas[j] - inter)
                        if float(ovr) > iou_threshold:
                            suppressed[j] = True
    return keep


def reference_batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> list:
    """Per-class brute force (exact class separation), merged by descending score, ties by index."""
    keep = []
    for cls in np.unique(idxs):
        members = np.flatnonzero(idxs == cls)
        keep.extend(int(members[k]) for k in reference_nms(boxes[members], scores[members], iou_threshold))
    return sorted(keep, key=lambda k: (-float(scores[k]), k))


def random_case(seed: int, num: int, num_classes: int, integer: bool):
    """Boxes on a small grid (many overlaps, exact IoU values such as 0.2), with degenerate and inverted
    boxes, scores from a few levels (exact ties), several classes."""
    rng = np.random.default_rng(seed)
    if integer:
        xy = rng.integers(0, 12, size=(num, 2)).astype(np.float32)
        wh = rng.integers(0, 8, size=(num, 2)).astype(np.float32)  # 0: degenerate
        scores = rng.integers(1, 6, size=num).astype(np.float32) / 5
    else:
        xy = rng.uniform(0, 50, size=(num, 2)).astype(np.float32)
        wh = rng.uniform(0, 30, size=(num, 2)).astype(np.float32)
        scores = rng.uniform(0, 1, size=num).astype(np.float32)
        scores[rng.integers(0, num, size=num // 4)] = scores[0]  # ties
    boxes = np.concatenate([xy, xy + wh], axis=1)
    inverted = rng.random(num) < 0.1
    boxes[inverted] = boxes[inverted][:, [2, 3, 0, 1]]
    idxs = rng.integers(0, num_classes, size=num)
    return boxes, scores, idxs


@pytest.fixture(autouse=True)
def pure_torch(monkeypatch):
    """Run every test on the pure-PyTorch path, whether or not torchvision is installed."""
    monkeypatch.setattr(nms_module, "torchvision_batched_nms", lambda: None)


@pytest.fixture(params=["pairs at once", "row by row"])
def suppress_path(request, monkeypatch):
    """Both ways of computing the IoUs: every pair at once (few boxes) and row by row (many boxes)."""
    if request.param == "row by row":
        monkeypatch.setattr(nms_module, "MATRIX_MAX_BOXES", 0)
    return request.param


@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.7])
@pytest.mark.parametrize("seed", range(3))
def test_single_class_matches_kernel(seed, threshold, integer, suppress_path):
    boxes, scores, _ = random_case(seed, 60, 1, integer)
    got = nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold)
    assert got.dtype == torch.int64
    assert got.tolist() == reference_nms(boxes, scores, threshold)


@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("threshold", [0.2, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_batched_matches_per_class_reference(seed, threshold, integer, suppress_path):
    boxes, scores, idxs = random_case(seed, 80, 4, integer)
    got = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(idxs), threshold)
    assert got.tolist() == reference_batched_nms(boxes, scores, idxs, threshold)


def test_batched_above_trick_limit_matches_reference():
    # More boxes than torchvision's coordinate-trick limit: the exact per-class path.
    boxes, scores, idxs = random_case(7, COORDINATE_TRICK_MAX_BOXES + 100, 6, integer=True)
    got = batched_nms_torch(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(idxs), 0.3)
    assert got.tolist() == reference_batched_nms(boxes, scores, idxs, 0.3)


def test_classes_do_not_suppress_each_other():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 0]), 0.5).tolist() == [0]


def test_iou_exactly_threshold_in_float32_is_suppressed_like_the_cpp_kernel(suppress_path):
    # IoU = 20 / 100 = float32(0.2) = 0.20000000298 > 0.2 (double): torchvision suppresses it.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 2.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.2).tolist() == [0]
    # IoU = 0.5 exactly: not > 0.5, kept.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]


def test_ties_keep_input_order_and_result_is_sorted(suppress_path):
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0], [10.0, 10.0, 11.0, 11.0], [20.0, 20, 21, 21]])
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5])
    assert batched_nms(boxes, scores, torch.tensor([1, 0, 0, 1]), 0.5).tolist() == [1, 0, 2, 3]
    # Identical boxes with tied scores: the first one in input order survives.
    same = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3)
    assert nms(same, torch.tensor([0.3, 0.3, 0.3]), 0.5).tolist() == [0]


def test_degenerate_and_inverted_boxes_never_suppress(suppress_path):
    boxes = torch.tensor([[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [10.0, 10.0, 0.0, 0.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 0.1).tolist() == [0, 1, 2, 3]


def test_empty_and_bad_shapes():
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.dtype == torch.int64 and empty.numel() == 0
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0
    with pytest.raises(ValueError, match="boxes"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="idxs"):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, dtype=torch.int64), 0.5)


def test_single_class_float64(suppress_path):
    boxes, scores, _ = random_case(3, 50, 1, integer=False)
    got = nms_torch(torch.from_numpy(boxes).double(), torch.from_numpy(scores).double(), 0.3)
    # The kernel in float64 (double IoU, double threshold).
    b = boxes.astype(np.float64)
    keep, order = [], sorted(range(len(scores)), key=lambda k: -float(scores[k]))
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    dead = set()
    for pos, i in enumerate(order):
        if i not in dead:
            keep.append(i)
            for j in order[pos + 1:]:
                w = max(0.0, min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]))
                h = max(0.0, min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]))
                union = area[i] + area[j] - w * h
                if union != 0 and (w * h) / union > 0.3:
                    dead.add(j)
    assert got.tolist() == keep


def _torchvision_ops():
    try:
        return importlib.import_module("torchvision.ops")
    except (ImportError, RuntimeError, OSError) as exc:
        pytest.skip(f"torchvision not importable here ({type(exc).__name__})")


@pytest.mark.parametrize("num", [80, COORDINATE_TRICK_MAX_BOXES + 50])
def test_matches_torchvision(num):
    ops = _torchvision_ops()
    boxes, scores, idxs = random_case(11, num, 5, integer=True)
    tb, ts, ti = torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(idxs)
    expected = torch.sort(ops.batched_nms(tb, ts, ti, 0.2)).values
    expected = expected[torch.sort(ts[expected], descending=True, stable=True).indices]
    assert batched_nms_torch(tb, ts, ti, 0.2).tolist() == expected.tolist()
    assert nms_torch(tb, ts, 0.4).tolist() == ops.nms(tb, ts, 0.4).tolist()
