"""The detection loss (efficientdet/loss.py): both formulations (yaep and official).

Expected values are written out by hand (closed-form focal / smooth-L1 / Huber terms with ``math``);
the vectorised loss is compared with straightforward per-image references written here from the
published algorithms (zylo117 ``FocalLoss``; google/automl ``ArgMaxMatcher`` + ``detection_loss``).
"""
from __future__ import annotations

import math
import struct
from typing import Tuple

import pytest
import torch
from torch import Tensor

from efficientdet.anchors import Anchors
from efficientdet.loss import FORMULATIONS, DetectionLoss, box_iou, match_anchors

# Tiny case: 4 anchors (y1, x1, y2, x2) and one box (x1, y1, x2, y2, class) = x 1..11, y 0..10, class 1.
#   IoU(A0) = 90 / 110 = 0.818 (positive), IoU(A1) = 100 / 220 = 0.4545 (yaep: ignored; official: negative),
#   IoU(A2) = IoU(A3) = 0 (negative).
TINY_ANCHORS = torch.tensor([[[0., 0., 10., 10.], [0., 0., 10., 22.], [0., 20., 10., 30.], [50., 50., 60., 60.]]])
TINY_BOX = torch.tensor([[[1., 0., 11., 10., 1.]]])
TINY_PROBS = torch.tensor([[[0.1, 0.8], [0.3, 0.6], [0.2, 0.5], [0.0, 1.0]]])
TINY_LOGITS = torch.tensor([[[-2.0, 1.0], [0.5, -1.0], [0.0, 3.0], [-4.0, -4.0]]])
# A0's box targets are (dy, dx, dh, dw) = (0, 0.1, 0, 0): centres 5 vs 6 on x, equal sizes.
TINY_REGRESSION = torch.tensor([[[0.05, -0.2, 0.0, 0.3], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0],
                                 [-1.0, -1.0, -1.0, -1.0]]])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _f32(x: float) -> float:
    """x rounded to float32 (the loss runs in float32: its clamp bound 1 - 1e-4 is 0.99989998)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _yaep_focal(p: float, target: int) -> float:
    """Published focal term on a probability clamped to [1e-4, 1 - 1e-4] (bounds as float32 holds them)."""
    p = min(max(p, _f32(1e-4)), _f32(1.0 - 1e-4))
    if target == 1:
        return 0.25 * (1.0 - p) ** 2 * -math.log(p)
    return 0.75 * p ** 2 * -math.log(1.0 - p)


def _official_focal(x: float, target: int, smoothing: float = 0.0) -> float:
    """Official focal term on a logit: focal factors from the hard target, CE on the smoothed one."""
    p = _sigmoid(x)
    p_t = p if target == 1 else 1.0 - p
    alpha_t = 0.25 if target == 1 else 0.75
    y = target * (1.0 - smoothing) + 0.5 * smoothing
    ce = max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))
    return alpha_t * (1.0 - p_t) ** 1.5 * ce


def _smooth_l1(d: float) -> float:
    d = abs(d)
    return 4.5 * d * d if d <= 1.0 / 9.0 else d - 0.5 / 9.0


def _huber(d: float) -> float:
    d = abs(d)
    return 0.5 * d * d if d <= 0.1 else 0.1 * d - 0.005


# --------------------------------------------------------------------------------------------------
# Per-image references.


def _ref_iou(anchor: Tensor, boxes: Tensor) -> Tensor:
    """The published calc_iou: anchor [N, 4] (y1, x1, y2, x2), boxes [M, 4] (x1, y1, x2, y2) -> [N, M]."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    iw = torch.min(anchor[:, 3:4], boxes[:, 2]) - torch.max(anchor[:, 1:2], boxes[:, 0])
    ih = torch.min(anchor[:, 2:3], boxes[:, 3]) - torch.max(anchor[:, 0:1], boxes[:, 1])
    iw, ih = iw.clamp(min=0), ih.clamp(min=0)
    ua = ((anchor[:, 2] - anchor[:, 0]) * (anchor[:, 3] - anchor[:, 1]))[:, None] + area - iw * ih
    return iw * ih / ua.clamp(min=1e-8)


def _ref_encode(gt: Tensor, anchor: Tensor) -> Tensor:
    """gt [K, 4] (x1, y1, x2, y2), anchor [K, 4] (y1, x1, y2, x2) -> [K, 4] (dy, dx, dh, dw), as published."""
    aw, ah = anchor[:, 3] - anchor[:, 1], anchor[:, 2] - anchor[:, 0]
    ax, ay = anchor[:, 1] + 0.5 * aw, anchor[:, 0] + 0.5 * ah
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    gw, gh = gw.clamp(min=1), gh.clamp(min=1)
    return torch.stack(((gy - ay) / ah, (gx - ax) / aw, torch.log(gh / ah), torch.log(gw / aw)), dim=1)


def reference_yaep(classifications: Tensor, regressions: Tensor, anchors: Tensor,
                   annotations: Tensor) -> Tuple[Tensor, Tensor]:
    """The published per-image loop (zylo117 efficientdet/loss.py), box loss × 50."""
    anchor = anchors[0]
    cls_losses, reg_losses = [], []
    for j in range(classifications.shape[0]):
        c = classifications[j].clamp(1e-4, 1.0 - 1e-4)
        r = regressions[j]
        ann = annotations[j][annotations[j][:, 4] != -1]
        if ann.shape[0] == 0:
            cls_losses.append((0.75 * c ** 2 * -torch.log(1.0 - c)).sum())
            reg_losses.append(torch.tensor(0.0))
            continue
        iou_max, iou_argmax = _ref_iou(anchor, ann[:, :4]).max(dim=1)
        targets = torch.full_like(c, -1.0)
        targets[iou_max < 0.4, :] = 0
        positive = iou_max >= 0.5
        assigned = ann[iou_argmax]
        targets[positive, :] = 0
        targets[positive, assigned[positive, 4].long()] = 1
        alpha = torch.where(targets == 1, 0.25, 0.75)
        weight = alpha * torch.where(targets == 1, 1.0 - c, c) ** 2
        bce = -(targets * torch.log(c) + (1.0 - targets) * torch.log(1.0 - c))
        loss = torch.where(targets != -1, weight * bce, torch.zeros_like(c))
        cls_losses.append(loss.sum() / positive.sum().clamp(min=1))
        if positive.sum() > 0:
            diff = (_ref_encode(assigned[positive, :4], anchor[positive]) - r[positive]).abs()
            reg_losses.append(torch.where(diff <= 1.0 / 9.0, 4.5 * diff ** 2, diff - 0.5 / 9.0).mean())
        else:
            reg_losses.append(torch.tensor(0.0))
    return torch.stack(cls_losses).mean(), torch.stack(reg_losses).mean() * 50


def reference_official(logits: Tensor, regressions: Tensor, anchors: Tensor, annotations: Tensor,
                       label_smoothing: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Per-image ArgMaxMatcher(0.5, 0.5, force_match_for_each_row) + the automl detection_loss, box × 50."""
    anchor = anchors[0]
    num_anchors, num_classes = logits.shape[1], logits.shape[2]
    cls_sum, box_sum, total_positive = 0.0, 0.0, 0
    for j in range(logits.shape[0]):
        ann = annotations[j][annotations[j][:, 4] != -1]
        matches = torch.full((num_anchors,), -1, dtype=torch.long)
        if ann.shape[0]:
            iou = _ref_iou(anchor, ann[:, :4])
            values, rows = iou.max(dim=1)
            matches = torch.where(values >= 0.5, rows, matches)
            for g in reversed(range(ann.shape[0])):  # the lowest row wins an anchor forced by several boxes
                matches[int(iou[:, g].argmax())] = g
        positive = matches >= 0
        total_positive += int(positive.sum())
        targets = torch.zeros(num_anchors, num_classes)
        box_targets = torch.zeros(num_anchors, 4)
        if positive.any():
            assigned = ann[matches[positive]]
            targets[positive, assigned[:, 4].long()] = 1.0
            box_targets[positive] = _ref_encode(assigned[:, :4], anchor[positive])
        x = logits[j]
        p = x.sigmoid()
        p_t = targets * p + (1 - targets) * (1 - p)
        alpha = targets * 0.25 + (1 - targets) * 0.75
        y = targets * (1 - label_smoothing) + 0.5 * label_smoothing
        ce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
        cls_sum = cls_sum + (alpha * (1 - p_t) ** 1.5 * ce).sum()
        diff = (box_targets - regressions[j]).abs()
        huber = torch.where(diff <= 0.1, 0.5 * diff ** 2, 0.1 * diff - 0.005)
        box_sum = box_sum + (huber * (box_targets != 0)).sum()
    normalizer = total_positive + 1.0
    return cls_sum / normalizer, box_sum / (4.0 * normalizer) * 50


# --------------------------------------------------------------------------------------------------
# Hand-computed tiny cases.


def test_yaep_tiny_case_by_hand():
    cls_loss, reg_loss = DetectionLoss("yaep")(TINY_PROBS, TINY_REGRESSION, TINY_ANCHORS, TINY_BOX)
    # A0 positive for class 1; A1 ignored (IoU 0.4545); A2, A3 negative; A3's 0 and 1 are clamped.
    expected_cls = (_yaep_focal(0.1, 0) + _yaep_focal(0.8, 1) + _yaep_focal(0.2, 0) + _yaep_focal(0.5, 0)
                    + _yaep_focal(0.0, 0) + _yaep_focal(1.0, 0)) / 1.0
    # 0.00079 + 0.00223 + 0.00669 + 0.12997 + 0 + 0.75 * 0.9999² * -ln(1.00017e-4) = 6.90625
    assert expected_cls == pytest.approx(7.04593, abs=1e-4)
    # Box: A0 only, targets (0, 0.1, 0, 0), regression (0.05, -0.2, 0, 0.3): |d| = (0.05, 0.3, 0, 0.3).
    expected_reg = 50 * (_smooth_l1(0.05) + _smooth_l1(0.3) + _smooth_l1(0.0) + _smooth_l1(0.3)) / 4
    assert expected_reg == pytest.approx(50 * (0.01125 + 2 * (0.3 - 0.5 / 9)) / 4)
    assert cls_loss.shape == () and reg_loss.shape == ()
    assert cls_loss.item() == pytest.approx(expected_cls, rel=1e-5)
    assert reg_loss.item() == pytest.approx(expected_reg, rel=1e-5)


def test_yaep_accepts_logits_like_probabilities():
    probs = torch.sigmoid(TINY_LOGITS)
    from_probs = DetectionLoss("yaep")(probs, TINY_REGRESSION, TINY_ANCHORS, TINY_BOX)
    from_logits = DetectionLoss("yaep", from_logits=True)(TINY_LOGITS, TINY_REGRESSION, TINY_ANCHORS, TINY_BOX)
    expected = (_yaep_focal(_sigmoid(-2.0), 0) + _yaep_focal(_sigmoid(1.0), 1) + _yaep_focal(0.5, 0)
                + _yaep_focal(_sigmoid(3.0), 0) + 2 * _yaep_focal(_sigmoid(-4.0), 0))
    assert from_logits[0].item() == pytest.approx(expected, rel=1e-5)
    assert from_probs[0].item() == pytest.approx(expected, rel=1e-5)


def test_official_tiny_case_by_hand():
    loss = DetectionLoss("official", from_logits=True)
    cls_loss, reg_loss = loss(TINY_LOGITS, TINY_REGRESSION, TINY_ANCHORS, TINY_BOX)
    # A0 positive for class 1; A1 (IoU 0.4545 < 0.5) is a negative here. One positive: normaliser 2.
    expected_cls = (_official_focal(-2.0, 0) + _official_focal(1.0, 1) + _official_focal(0.5, 0)
                    + _official_focal(-1.0, 0) + _official_focal(0.0, 0) + _official_focal(3.0, 0)
                    + 2 * _official_focal(-4.0, 0)) / 2.0
    # Box: only A0's dx has a non-zero target (0.1); |0.1 - (-0.2)| = 0.3 -> Huber 0.1 * 0.3 - 0.005 = 0.025.
    expected_reg = 50 * _huber(0.3) / (4 * 2.0)
    assert expected_reg == pytest.approx(0.15625)
    assert cls_loss.item() == pytest.approx(expected_cls, rel=1e-5)
    assert reg_loss.item() == pytest.approx(expected_reg, rel=1e-5)


def test_official_label_smoothing_changes_only_the_cross_entropy_target():
    loss = DetectionLoss("official", from_logits=True, label_smoothing=0.1)
    cls_loss, reg_loss = loss(TINY_LOGITS, TINY_REGRESSION, TINY_ANCHORS, TINY_BOX)
    terms = [(-2.0, 0), (1.0, 1), (0.5, 0), (-1.0, 0), (0.0, 0), (3.0, 0), (-4.0, 0), (-4.0, 0)]
    expected = sum(_official_focal(x, t, smoothing=0.1) for x, t in terms) / 2.0
    unsmoothed = sum(_official_focal(x, t) for x, t in terms) / 2.0
    assert abs(expected - unsmoothed) > 1e-3
    assert cls_loss.item() == pytest.approx(expected, rel=1e-5)
    assert reg_loss.item() == pytest.approx(50 * 0.025 / 8, rel=1e-5)


def test_official_from_probabilities_converts_to_logits():
    probs = torch.sigmoid(TINY_LOGITS)
    a = DetectionLoss("official")(probs, TINY_REGRESSION, TINY_ANCHORS, TINY_BOX)
    b = DetectionLoss("official", from_logits=True)(TINY_LOGITS, TINY_REGRESSION, TINY_ANCHORS, TINY_BOX)
    assert a[0].item() == pytest.approx(b[0].item(), rel=1e-4)
    assert a[1].item() == pytest.approx(b[1].item(), rel=1e-6)


def test_box_loss_weight_scales_only_the_box_loss():
    base = DetectionLoss("yaep")(TINY_PROBS, TINY_REGRESSION, TINY_ANCHORS, TINY_BOX)
    unweighted = DetectionLoss("yaep", box_loss_weight=1.0)(TINY_PROBS, TINY_REGRESSION, TINY_ANCHORS, TINY_BOX)
    assert unweighted[0].item() == pytest.approx(base[0].item())
    assert unweighted[1].item() == pytest.approx(base[1].item() / 50, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Images without boxes, mixed batches, ignored anchors, forced matches.


@pytest.mark.parametrize("annotations", [torch.full((1, 3, 5), -1.0), torch.zeros(1, 0, 5),
                                         torch.tensor([[[1., 0., 11., 10., -1.]]])],
                         ids=["padding-rows", "no-rows", "class-minus-one-with-coordinates"])
def test_image_without_boxes_gives_only_the_negative_term(annotations):
    cls_loss, reg_loss = DetectionLoss("yaep")(TINY_PROBS, TINY_REGRESSION, TINY_ANCHORS, annotations)
    expected = sum(_yaep_focal(p, 0) for p in (0.1, 0.8, 0.3, 0.6, 0.2, 0.5, 0.0, 1.0))
    assert cls_loss.item() == pytest.approx(expected, rel=1e-5)
    assert reg_loss.item() == 0.0
    cls_loss, reg_loss = DetectionLoss("official", from_logits=True)(TINY_LOGITS, TINY_REGRESSION, TINY_ANCHORS,
                                                                     annotations)
    expected = sum(_official_focal(x, 0) for x in (-2.0, 1.0, 0.5, -1.0, 0.0, 3.0, -4.0, -4.0)) / 1.0
    assert cls_loss.item() == pytest.approx(expected, rel=1e-5)
    assert reg_loss.item() == 0.0


def test_batch_mixing_image_with_and_without_boxes():
    probs = torch.cat([TINY_PROBS, TINY_PROBS.flip(1)])
    regression = torch.cat([TINY_REGRESSION, TINY_REGRESSION])
    annotations = torch.cat([TINY_BOX, torch.full((1, 1, 5), -1.0)])
    cls_loss, reg_loss = DetectionLoss("yaep")(probs, regression, TINY_ANCHORS, annotations)
    with_box = (_yaep_focal(0.1, 0) + _yaep_focal(0.8, 1) + _yaep_focal(0.2, 0) + _yaep_focal(0.5, 0)
                + _yaep_focal(0.0, 0) + _yaep_focal(1.0, 0))
    without = sum(_yaep_focal(p, 0) for p in (0.1, 0.8, 0.3, 0.6, 0.2, 0.5, 0.0, 1.0))
    assert cls_loss.item() == pytest.approx((with_box + without) / 2, rel=1e-5)
    box = 50 * (_smooth_l1(0.05) + 2 * _smooth_l1(0.3)) / 4
    assert reg_loss.item() == pytest.approx(box / 2, rel=1e-5)  # averaged with the other image's 0
    assert torch.isfinite(cls_loss) and torch.isfinite(reg_loss)


def test_official_normalises_by_batch_positives():
    logits = torch.cat([TINY_LOGITS, TINY_LOGITS])
    regression = torch.cat([TINY_REGRESSION, TINY_REGRESSION])
    annotations = torch.cat([TINY_BOX, torch.full((1, 1, 5), -1.0)])
    cls_loss, reg_loss = DetectionLoss("official", from_logits=True)(logits, regression, TINY_ANCHORS, annotations)
    with_box = (_official_focal(-2.0, 0) + _official_focal(1.0, 1) + _official_focal(0.5, 0)
                + _official_focal(-1.0, 0) + _official_focal(0.0, 0) + _official_focal(3.0, 0)
                + 2 * _official_focal(-4.0, 0))
    without = sum(_official_focal(x, 0) for x in (-2.0, 1.0, 0.5, -1.0, 0.0, 3.0, -4.0, -4.0))
    assert cls_loss.item() == pytest.approx((with_box + without) / 2.0, rel=1e-5)  # 1 positive + 1
    assert reg_loss.item() == pytest.approx(50 * 0.025 / 8, rel=1e-5)


def test_yaep_ignored_anchor_contributes_nothing():
    loss = DetectionLoss("yaep")
    base = loss(TINY_PROBS, TINY_REGRESSION, TINY_ANCHORS, TINY_BOX)
    changed = TINY_PROBS.clone()
    changed[0, 1] = torch.tensor([0.99, 0.01])  # A1: IoU 0.4545, between the thresholds
    changed_reg = TINY_REGRESSION.clone()
    changed_reg[0, 1] = 7.0
    after = loss(changed, changed_reg, TINY_ANCHORS, TINY_BOX)
    assert after[0].item() == base[0].item()
    assert after[1].item() == base[1].item()
    # Control: the same change on a negative anchor (A2) does change the loss.
    control = TINY_PROBS.clone()
    control[0, 2] = torch.tensor([0.99, 0.01])
    assert loss(control, TINY_REGRESSION, TINY_ANCHORS, TINY_BOX)[0].item() > base[0].item() + 1.0


def test_forced_match_when_best_iou_below_threshold():
    # Box x 0..10, y 0..25 (area 250): IoU(A0) = 100 / 250 = 0.4, IoU(A1) = 250 / 600 = 0.4167, IoU(A2) = 0.
    anchors = torch.tensor([[[0., 0., 10., 10.], [0., 0., 60., 10.], [100., 100., 110., 110.]]])
    annotations = torch.tensor([[[0., 0., 10., 25., 0.]]])
    matched, positive, negative = match_anchors(anchors[0], annotations, FORMULATIONS["official"])
    assert positive.tolist() == [[False, True, False]]
    assert negative.tolist() == [[True, False, True]]
    assert int(matched[0, 1]) == 0
    _, positive, negative = match_anchors(anchors[0], annotations, FORMULATIONS["yaep"])
    assert positive.tolist() == [[False, False, False]]
    assert negative.tolist() == [[False, False, True]]  # 0.4 and 0.4167 are ignored

    logits = torch.tensor([[[1.0], [-1.0], [2.0]]])
    regression = torch.zeros(1, 3, 4)
    cls_loss, reg_loss = DetectionLoss("official", from_logits=True)(logits, regression, anchors, annotations)
    expected_cls = (_official_focal(1.0, 0) + _official_focal(-1.0, 1) + _official_focal(2.0, 0)) / 2.0
    assert cls_loss.item() == pytest.approx(expected_cls, rel=1e-5)
    # A1 targets: dy = (12.5 - 30) / 60, dx = 0, dh = log(25 / 60), dw = 0 (masked: exactly 0).
    dy, dh = (12.5 - 30.0) / 60.0, math.log(25.0 / 60.0)
    assert reg_loss.item() == pytest.approx(50 * (_huber(dy) + _huber(dh)) / (4 * 2.0), rel=1e-5)
    # yaep: no positive anchor -> box loss 0, classification over the one negative anchor only.
    cls_loss, reg_loss = DetectionLoss("yaep", from_logits=True)(logits, regression, anchors, annotations)
    assert cls_loss.item() == pytest.approx(_yaep_focal(_sigmoid(2.0), 0), rel=1e-5)
    assert reg_loss.item() == 0.0


def test_forced_match_overrides_argmax_and_lowest_row_wins():
    # A0 = 10x10, A1 = 10 high x 11 wide. Box 2 (x 0..11) has IoU 0.909 with A0 but its best anchor is A1
    # (IoU 1); box 0 (3x3) has best anchor A0 (IoU 0.09), so A0 is forced onto box 0. Row 1 is padding.
    anchors = torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 11.]])
    annotations = torch.tensor([[[0., 0., 3., 3., 0.], [-1., -1., -1., -1., -1.], [0., 0., 11., 10., 1.]]])
    matched, positive, _ = match_anchors(anchors, annotations, FORMULATIONS["official"])
    assert positive.tolist() == [[True, True]]
    assert matched.tolist() == [[0, 2]]
    matched, positive, _ = match_anchors(anchors, annotations, FORMULATIONS["yaep"])
    assert positive.tolist() == [[True, True]]
    assert matched.tolist() == [[2, 2]]
    # Two boxes forcing the same anchor: the lower row takes it.
    same = torch.tensor([[[0., 0., 3., 3., 0.], [0., 0., 2., 2., 1.]]])
    matched, positive, _ = match_anchors(anchors, same, FORMULATIONS["official"])
    assert positive.tolist() == [[True, False]]
    assert int(matched[0, 0]) == 0


def test_box_iou_by_hand():
    anchors = torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 22.], [5., 5., 6., 6.]])
    boxes = torch.tensor([[[1., 0., 11., 10.], [20., 20., 20., 20.]]])
    iou = box_iou(anchors, boxes)
    assert iou.shape == (1, 3, 2)
    torch.testing.assert_close(iou[0, :, 0], torch.tensor([90 / 110, 100 / 220, 1 / 100]))
    assert iou[0, :, 1].tolist() == [0.0, 0.0, 0.0]


def test_invalid_inputs_raise_value_error():
    loss = DetectionLoss("yaep")
    bad_class = TINY_BOX.clone()
    bad_class[0, 0, 4] = 2  # C = 2
    with pytest.raises(ValueError, match=r"class ids.*\[2\.0\]"):
        loss(TINY_PROBS, TINY_REGRESSION, TINY_ANCHORS, bad_class)
    with pytest.raises(ValueError, match="regression"):
        loss(TINY_PROBS, TINY_REGRESSION[:, :3], TINY_ANCHORS, TINY_BOX)
    with pytest.raises(ValueError, match="annotations"):
        loss(TINY_PROBS, TINY_REGRESSION, TINY_ANCHORS, TINY_BOX[..., :4])
    with pytest.raises(ValueError, match="'focal'"):
        DetectionLoss("focal")
    with pytest.raises(ValueError, match="label_smoothing"):
        DetectionLoss("yaep", label_smoothing=0.1)


# --------------------------------------------------------------------------------------------------
# Vectorised == per-image reference on random batches.


def _random_batch(seed: int, counts: Tuple[int, ...], num_classes: int = 3, size: int = 128):
    gen = torch.Generator().manual_seed(seed)
    anchors = Anchors().forward(torch.zeros(1, 3, size, size))                 # [1, 3069, 4] float32
    batch, num_anchors = len(counts), anchors.shape[1]
    max_boxes = max(max(counts), 1) + 2
    # Padding rows: class -1 with random coordinates (only the class marks padding).
    annotations = torch.cat([torch.rand(batch, max_boxes, 4, generator=gen) * size,
                             torch.full((batch, max_boxes, 1), -1.0)], dim=2)
    for j, count in enumerate(counts):
        rows = torch.randperm(max_boxes, generator=gen)[:count]                # padding rows interleaved
        for row in rows.tolist():
            if torch.rand(1, generator=gen).item() < 0.6:  # jittered copy of an anchor: makes positives
                y1, x1, y2, x2 = anchors[0, torch.randint(num_anchors, (1,), generator=gen)].squeeze(0).tolist()
                h, w = y2 - y1, x2 - x1
                jitter = (torch.rand(4, generator=gen) - 0.5) * 0.3
                box = [x1 + jitter[0] * w, y1 + jitter[1] * h, x2 + jitter[2] * w, y2 + jitter[3] * h]
            else:
                xy = torch.rand(2, generator=gen) * size
                wh = torch.rand(2, generator=gen) * size / 2 + 0.5
                box = [xy[0], xy[1], xy[0] + wh[0], xy[1] + wh[1]]
            cls = torch.randint(num_classes, (1,), generator=gen).item()
            annotations[j, row] = torch.tensor([float(v) for v in box] + [float(cls)])
    logits = torch.randn(batch, num_anchors, num_classes, generator=gen) * 3
    regression = torch.randn(batch, num_anchors, 4, generator=gen) * 0.3
    return logits, regression, anchors, annotations


@pytest.mark.parametrize("seed, counts", [(0, (3, 0, 1, 5)), (1, (0, 0)), (2, (7,)), (3, (1, 2, 0, 9, 4))])
def test_yaep_matches_per_image_reference(seed, counts):
    logits, regression, anchors, annotations = _random_batch(seed, counts)
    probs = logits.sigmoid()
    expected = reference_yaep(probs, regression, anchors, annotations)
    got = DetectionLoss("yaep")(probs, regression, anchors, annotations)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1].float(), rtol=1e-5, atol=1e-6)
    if sum(counts):
        assert got[1].item() > 0  # the random boxes do produce positives


@pytest.mark.parametrize("seed, counts, smoothing", [(0, (3, 0, 1, 5), 0.0), (1, (0, 0), 0.0),
                                                     (2, (7,), 0.1), (3, (1, 2, 0, 9, 4), 0.0)])
def test_official_matches_per_image_reference(seed, counts, smoothing):
    logits, regression, anchors, annotations = _random_batch(seed, counts)
    expected = reference_official(logits, regression, anchors, annotations, label_smoothing=smoothing)
    got = DetectionLoss("official", from_logits=True, label_smoothing=smoothing)(logits, regression, anchors, annotations)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], torch.as_tensor(expected[1]).float(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Precision, autocast, gradients.


@pytest.mark.parametrize("formulation", ["yaep", "official"])
def test_bf16_inputs_are_computed_in_float32(formulation):
    logits, regression, anchors, annotations = _random_batch(5, (2, 0, 4))
    inputs = logits if formulation == "official" else logits.sigmoid()
    loss = DetectionLoss(formulation, from_logits=formulation == "official")
    low = (inputs.bfloat16(), regression.bfloat16())
    low_anchors = anchors.bfloat16()
    expected = loss(low[0].float(), low[1].float(), low_anchors.float(), annotations)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(low[0], low[1], low_anchors, annotations)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    # Same values as the float32 loss on the bf16 values: nothing is computed in bf16.
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("formulation", ["yaep", "official"])
def test_gradients_finite_through_d0(formulation):
    from backbone import EfficientDet

    torch.manual_seed(0)
    model = EfficientDet(num_classes=3, compound_coef=0).train()
    images = torch.randn(2, 3, 128, 128)
    features, regression, classification, anchors = model(images, logits=formulation == "official")
    annotations = torch.tensor([[[10., 20., 60., 90., 0.], [70., 5., 120., 40., 2.]],
                                [[32., 32., 96., 96., 1.], [-1., -1., -1., -1., -1.]]])
    cls_loss, reg_loss = DetectionLoss(formulation, from_logits=formulation == "official")(
        classification, regression, anchors, annotations)
    assert torch.isfinite(cls_loss) and torch.isfinite(reg_loss)
    assert reg_loss.item() > 0
    (cls_loss + reg_loss).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["regressor.header.pointwise_conv.conv.weight"].abs().sum() > 0
    assert grads["classifier.header.pointwise_conv.conv.weight"].abs().sum() > 0
