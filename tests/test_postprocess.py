"""Post-processing: the conformance detections, and a non-trivial case against a per-image brute force."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.inference import nms as nms_module
from utils.inference.postprocess import Detections, postprocess, postprocess_tensors

from tests.test_nms import reference_nms


@pytest.fixture(autouse=True)
def pure_torch(monkeypatch):
    monkeypatch.setattr(nms_module, "torchvision_batched_nms", lambda: None)


def reference_postprocess(height, width, anchors, regression, classification, threshold, iou_threshold):
    """The published post-processing per image in numpy float32: decode, clip, max score, > threshold, per-class
    brute-force NMS, descending score."""
    a = anchors[0].astype(np.float32)
    ya, xa = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
    ha, wa = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    out = []
    for b in range(regression.shape[0]):
        r = regression[b].astype(np.float32)
        w, h = np.exp(r[:, 3]) * wa, np.exp(r[:, 2]) * ha
        yc, xc = r[:, 0] * ha + ya, r[:, 1] * wa + xa
        boxes = np.stack([np.maximum(xc - w / 2, 0), np.maximum(yc - h / 2, 0),
                          np.minimum(xc + w / 2, width - 1), np.minimum(yc + h / 2, height - 1)], axis=1)
        scores = classification[b].max(axis=1)
        classes = classification[b].argmax(axis=1)
        idx = np.flatnonzero(scores > threshold)
        keep = []
        for cls in np.unique(classes[idx]):
            members = idx[classes[idx] == cls]
            keep.extend(members[k] for k in reference_nms(boxes[members], scores[members], iou_threshold))
        keep = sorted(keep, key=lambda k: (-float(scores[k]), k))
        out.append((boxes[keep], classes[keep], scores[keep]))
    return out


def run(vectors, classification, threshold, iou_threshold):
    height, width = vectors["input"].shape[2:]
    return postprocess((height, width), torch.from_numpy(vectors["anchors"]), torch.from_numpy(vectors["regression"]),
                       torch.from_numpy(classification), threshold, iou_threshold)


def gap_threshold(scores: np.ndarray, low: int = 10, high: int = 200) -> float:
    """A threshold in the widest gap between the low-th and high-th largest of ``scores`` (so that float
    round-off cannot move a score across it)."""
    top = np.sort(scores.ravel())[::-1][:high + 1]
    gaps = top[low:high] - top[low + 1:high + 1]
    i = low + int(np.argmax(gaps))
    return float((top[i] + top[i + 1]) / 2)


def test_conformance_detections_are_the_stored_ones(d0_vectors):
    """The stored detections of the published implementation (threshold 0.2, IoU 0.2) are empty for both
    images: its model's best class probability is 0.0816. Ours are empty too."""
    best = d0_vectors["classification"].max(axis=2)
    for b, det in enumerate(run(d0_vectors, d0_vectors["classification"], 0.2, 0.2)):
        assert d0_vectors[f"det{b}_rois"].size == d0_vectors[f"det{b}_scores"].size == 0
        assert 0.08 < best[b].max() < 0.2 and len(det) == 0


@pytest.mark.parametrize("iou_threshold", [0.2, 0.5])
def test_conformance_outputs_at_a_lower_threshold_match_the_published_rules(d0_vectors, iou_threshold):
    """The stored outputs of the published implementation, post-processed where detections exist (a threshold
    in the widest gap of the best scores), equal the published rules written out (reference_postprocess)."""
    classification = d0_vectors["classification"]
    threshold = gap_threshold(classification.max(axis=2))
    height, width = d0_vectors["input"].shape[2:]
    dets = run(d0_vectors, classification, threshold, iou_threshold)
    expected = reference_postprocess(height, width, d0_vectors["anchors"], d0_vectors["regression"], classification,
                                     threshold, iou_threshold)
    assert len(dets) == 2
    for det, (boxes, classes, scores) in zip(dets, expected):
        assert 0 < len(det) == len(scores)
        assert det.boxes.shape == (len(scores), 4) and det.boxes.dtype == np.float32
        np.testing.assert_array_equal(det.class_ids, classes.astype(np.int64))
        np.testing.assert_allclose(det.boxes, boxes, atol=1e-4, rtol=0)
        np.testing.assert_allclose(det.scores, scores, atol=1e-6, rtol=0)
        assert np.all(det.scores > threshold)


def crafted_classification(num_anchors: int, picked: int, num_classes: int, seed: int) -> np.ndarray:
    """Tensor[2, N, 90] probabilities: background below 0.2 everywhere, ``picked`` anchors per image with one of
    ``num_classes`` classes scored on a coarse grid (exact ties), a few anchors with two high classes."""
    rng = np.random.default_rng(seed)
    out = (rng.random((2, num_anchors, 90)) * 0.2).astype(np.float32)
    for b in range(2):
        anchors = rng.choice(num_anchors, size=picked, replace=False)
        classes = rng.choice(90, size=num_classes, replace=False)[rng.integers(0, num_classes, size=picked)]
        out[b, anchors, classes] = np.round(rng.uniform(0.2, 1.0, size=picked), 1).astype(np.float32)
    return out


@pytest.mark.parametrize("picked, num_classes, iou_threshold", [(400, 5, 0.2), (1100, 8, 0.5)])
def test_non_trivial_detections_match_reference(d0_vectors, picked, num_classes, iou_threshold):
    # Real regression and anchors with crafted class scores (spread, with exact ties) exercise decoding,
    # clipping, thresholding, NMS (both torchvision dispatch paths) and ordering on many classes.
    num_anchors = d0_vectors["regression"].shape[1]
    classification = crafted_classification(num_anchors, picked, num_classes, seed=picked)
    height, width = d0_vectors["input"].shape[2:]
    dets = run(d0_vectors, classification, 0.2, iou_threshold)
    expected = reference_postprocess(height, width, d0_vectors["anchors"], d0_vectors["regression"],
                                     classification, 0.2, iou_threshold)
    for det, (boxes, classes, scores) in zip(dets, expected):
        assert 10 < len(det) < picked  # detections survive, NMS removed some
        assert len(det) == len(scores)
        np.testing.assert_array_equal(det.class_ids, classes.astype(np.int64))
        np.testing.assert_allclose(det.boxes, boxes, atol=1e-4, rtol=0)
        np.testing.assert_allclose(det.scores, scores, atol=1e-6, rtol=0)
        assert np.all(np.diff(det.scores) <= 0)
        assert np.all(det.boxes[:, [0, 2]] <= width - 1) and np.all(det.boxes[:, [1, 3]] <= height - 1)
        assert np.all(det.boxes >= 0)


def test_class_names_and_float16_outputs(d0_vectors):
    classification = crafted_classification(d0_vectors["regression"].shape[1], 200, 4, seed=0)
    height, width = d0_vectors["input"].shape[2:]
    names = tuple(f"name{i}" for i in range(90))
    dets32 = postprocess((height, width), torch.from_numpy(d0_vectors["anchors"]),
                         torch.from_numpy(d0_vectors["regression"]), torch.from_numpy(classification), 0.2, 0.2, names)
    assert dets32[0].class_names == [names[i] for i in dets32[0].class_ids]
    # Half-precision network outputs are post-processed in float32.
    dets16 = postprocess((height, width), torch.from_numpy(d0_vectors["anchors"]),
                         torch.from_numpy(d0_vectors["regression"]).half(),
                         torch.from_numpy(classification).half(), 0.2, 0.2)
    assert dets16[0].boxes.dtype == np.float32 and dets16[0].scores.dtype == np.float32
    with pytest.raises(ValueError, match="obj_list"):
        postprocess((height, width), torch.from_numpy(d0_vectors["anchors"]),
                    torch.from_numpy(d0_vectors["regression"]), torch.from_numpy(classification), 0.2, 0.2, ("a",))


def test_threshold_is_strict_and_empty_images():
    anchors = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]]])
    regression = torch.zeros(2, 2, 4)
    classification = torch.tensor([[[0.5, 0.1], [0.1, 0.7]], [[0.2, 0.2], [0.0, 0.1]]])
    results = postprocess_tensors((64, 64), anchors, regression, classification, 0.2, 0.5)
    boxes, class_ids, scores = results[0]
    assert class_ids.tolist() == [1, 0] and scores.tolist() == pytest.approx([0.7, 0.5])
    assert boxes.tolist() == [[20.0, 20.0, 40.0, 40.0], [0.0, 0.0, 10.0, 10.0]]
    assert results[1][0].shape == (0, 4)  # score 0.2 is not > 0.2
    empty = postprocess((64, 64), anchors, regression, classification, 0.9, 0.5)
    assert [len(d) for d in empty] == [0, 0]
    assert empty[0].boxes.shape == (0, 4) and empty[0].class_ids.dtype == np.int64


def test_bad_shapes():
    with pytest.raises(ValueError, match="regression"):
        postprocess_tensors((64, 64), torch.zeros(1, 2, 4), torch.zeros(1, 2, 3), torch.zeros(1, 2, 2), 0.2, 0.2)
    with pytest.raises(ValueError, match="anchors"):
        postprocess_tensors((64, 64), torch.zeros(1, 3, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 2), 0.2, 0.2)


def test_detections_empty():
    det = Detections.empty()
    assert len(det) == 0 and det.boxes.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows", [4096, 4095, 499, 1])  # screened in groups of 16, 9; none (prime, 1)
@pytest.mark.parametrize("num_classes", [1, 3, 90, 91])
def test_rows_above_threshold_equals_row_maximum(num_rows, num_classes, dtype):
    from utils.inference.postprocess import _rows_above

    torch.manual_seed(num_rows + num_classes)
    scores = (torch.rand(num_rows, num_classes) * 0.3).to(dtype)
    scores[::97, -1] = 0.9  # last and first columns count
    scores[5::89, 0] = 0.7
    scores[3::101, num_classes // 2] = 0.2  # exactly the threshold (float32 0.2): not above
    scores[7::103, num_classes // 2] = torch.tensor(0.2).to(dtype).float().item()  # bf16 0.2002: above
    scores[11::107] = -0.8  # negative rows (logits), -0.0 and inf
    scores[13::109, 0] = -0.0
    scores[19::127, -1] = float("inf")
    for threshold in (0.2, 0.5, 0.05, 0.0, -0.5):  # few rows pass, fewer, most (all get a maximum), signs
        want = torch.nonzero(scores.float().amax(dim=1) > threshold).squeeze(1)
        got, rows = _rows_above(scores, threshold)
        assert torch.equal(got, want), (threshold, got.numel(), want.numel())
        assert rows.dtype == torch.float32 and torch.equal(rows, scores[want].float())
    # A NaN row does not hide the other rows of its group (NaN rows themselves follow amax).
    scores[2::7] = float("nan")
    passing = torch.nonzero(scores.float().amax(dim=1) > 0.5).squeeze(1)
    assert set(passing.tolist()) <= set(_rows_above(scores, 0.5)[0].tolist())
