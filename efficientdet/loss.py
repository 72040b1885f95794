"""Detection loss: sigmoid focal loss plus a box regression loss (DEVELOPING.md, 'The two losses').

Two formulations, selected by ``DetectionLoss(formulation=...)``:

``"yaep"`` (default) — the published PyTorch implementation whose checkpoints this project loads:

- focal loss α 0.25, γ 2.0 on probabilities clamped to [1e-4, 1 − 1e-4];
- an anchor is positive if its best IoU with a ground-truth box is ≥ 0.5, negative if < 0.4, ignored
  in between (ignored anchors contribute nothing); no forced matches;
- classification loss summed per image and divided by that image's positives (min 1);
- box targets from :func:`efficientdet.anchors.encode_boxes`, smooth-L1 with β 1/9
  (``where(d <= 1/9, 4.5·d², d − 0.5/9)``), averaged over the image's positives × 4 (0 without positives);
- both averaged over the batch; the box loss is returned multiplied by ``box_loss_weight`` (50).

``"official"`` — the TensorFlow reference (google/automl ``det_model_fn.py``):

- focal loss α 0.25, γ 1.5 on logits (binary cross-entropy with logits, numerically stable); optional
  label smoothing of the cross-entropy target only (the focal factors use the hard target);
- positive and negative IoU threshold both 0.5 (so nothing is ignored), and every ground-truth box is
  force-matched to its best anchor (``ArgMaxMatcher(force_match_for_each_row=True)``: the anchor with
  the highest IoU for that box, the first on ties; an anchor forced by several boxes takes the box
  with the lowest row index);
- Huber loss δ 0.1 on box targets, on the positive anchors' coordinates whose target is not exactly
  0 (the official ``mask = box_targets != 0``);
- both losses summed over the batch and divided by (total positives + 1), the box loss also by 4;
  the box loss is returned multiplied by ``box_loss_weight`` (50).

Known deviation from the official loss: box targets come from the project's single box coder
(:func:`~efficientdet.anchors.encode_boxes`, GT width/height clamped to ≥ 1 pixel) where the official
coder adds 1e-8 to every width/height; the two differ only for boxes thinner than one pixel.

The loss is computed in float32 (float64 if the predictions are float64) whatever the input dtype, so
it is safe under autocast with bf16/fp16 predictions; it follows the inputs' device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efficientdet.anchors import encode_boxes

logger = logging.getLogger(__name__)

PROB_CLAMP = 1e-4
"""yaep clamps probabilities to [PROB_CLAMP, 1 − PROB_CLAMP] before the focal loss."""

LOGIT_EPS = 1e-6
"""official formulation fed probabilities: logits are ``logit(p.clamp(LOGIT_EPS, 1 − LOGIT_EPS))``."""

IOU_UNION_MIN = 1e-8
"""The published IoU clamps the union to at least this value."""


@dataclass(frozen=True)
class LossSettings:
    """Constants of one loss formulation.

    Attributes:
        alpha: focal loss weight of the positive class (1 − alpha for negatives).
        gamma: focal loss focusing exponent.
        positive_iou: an anchor whose best IoU is ≥ this is positive.
        negative_iou: an anchor whose best IoU is < this is negative (ignored in between).
        force_match: every ground-truth box is also matched to its best anchor.
        box_delta: smooth-L1 β (yaep) or Huber δ (official).
    """

    alpha: float
    gamma: float
    positive_iou: float
    negative_iou: float
    force_match: bool
    box_delta: float


FORMULATIONS: Dict[str, LossSettings] = {
    "yaep": LossSettings(alpha=0.25, gamma=2.0, positive_iou=0.5, negative_iou=0.4, force_match=False,
                         box_delta=1.0 / 9.0),
    "official": LossSettings(alpha=0.25, gamma=1.5, positive_iou=0.5, negative_iou=0.5, force_match=True,
                             box_delta=0.1),
}


def box_iou(anchors: Tensor, boxes: Tensor) -> Tensor:
    """IoU of every anchor with every box of every image, as the published ``calc_iou`` computes it
    (areas without +1, union clamped to ≥ 1e-8).

    anchors: Tensor[N, 4] (y1, x1, y2, x2), input pixels; boxes: Tensor[B, M, 4] (x1, y1, x2, y2),
    input pixels -> Tensor[B, N, M].
    """
    ay1, ax1, ay2, ax2 = (anchors[None, :, i, None] for i in range(4))          # [1, N, 1]
    bx1, by1, bx2, by2 = (boxes[:, None, :, i] for i in range(4))               # [B, 1, M]
    area = (bx2 - bx1) * (by2 - by1)
    iw = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
    ih = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0)
    intersection = iw * ih
    union = ((ay2 - ay1) * (ax2 - ax1) + area - intersection).clamp(min=IOU_UNION_MIN)
    return intersection / union


def match_anchors(anchors: Tensor, annotations: Tensor, settings: LossSettings) -> Tuple[Tensor, Tensor, Tensor]:
    """Assign ground-truth boxes to anchors for a whole padded batch.

    anchors: Tensor[N, 4] (y1, x1, y2, x2), input pixels; annotations: Tensor[B, M, 5]
    (x1, y1, x2, y2, class_id), input pixels, rows with class −1 are padding (M may be 0).

    Returns ``(matched, positive, negative)``:

    - matched: Tensor[B, N] int64, index into M of the box each anchor is assigned to (meaningful only
      where ``positive``);
    - positive: Tensor[B, N] bool, anchors with a target box;
    - negative: Tensor[B, N] bool, background anchors. Anchors neither positive nor negative are ignored.
    """
    batch, num_boxes = annotations.shape[0], annotations.shape[1]
    num_anchors = anchors.shape[0]
    if num_boxes == 0:
        matched = torch.zeros(batch, num_anchors, dtype=torch.long, device=anchors.device)
        nothing = torch.zeros(batch, num_anchors, dtype=torch.bool, device=anchors.device)
        return matched, nothing, ~nothing
    valid = annotations[..., 4] != -1                                             # [B, M]
    iou = box_iou(anchors, annotations[..., :4])                                  # [B, N, M]
    iou = iou.masked_fill(~valid[:, None, :], -1.0)                               # padding never wins
    best_iou = iou.amax(dim=2)                                                    # [B, N]; -1: no box
    matched = iou.argmax(dim=2)                                                   # first on ties
    positive = best_iou >= settings.positive_iou
    if settings.force_match:
        best_anchor = iou.argmax(dim=1)                                           # [B, M], first on ties
        rows = torch.arange(num_boxes, device=anchors.device).expand(batch, num_boxes)
        rows = torch.where(valid, rows, torch.full_like(rows, num_boxes))         # padding: sentinel M
        forced_row = torch.full((batch, num_anchors), num_boxes, dtype=torch.long, device=anchors.device)
        forced_row = forced_row.scatter_reduce(1, best_anchor, rows, reduce="amin", include_self=True)
        forced = forced_row < num_boxes
        matched = torch.where(forced, forced_row, matched)
        positive = positive | forced
    negative = ~positive & (best_iou < settings.negative_iou)
    return matched, positive, negative


class DetectionLoss(nn.Module):
    """Focal classification loss and box regression loss of EfficientDet (module docstring: the rules).

    Args:
        formulation: "yaep" (the published PyTorch loss; default) or "official" (TensorFlow reference).
        from_logits: whether ``classification`` holds pre-sigmoid logits (``model(images, logits=True)``)
            instead of the sigmoid probabilities ``EfficientDet.forward`` returns. "yaep" applies a
            sigmoid to logits (identical to the published loss). "official" is defined on logits: pass
            logits for the faithful loss; probabilities are converted with
            ``logit(p.clamp(1e-6, 1 − 1e-6))``, exact only where the probabilities are not saturated.
        label_smoothing: official only: cross-entropy target ``t·(1 − s) + 0.5·s`` (0 = off).
        box_loss_weight: factor applied to the returned box loss (50 in both formulations).

    ``forward(classification, regression, anchors, annotations)``:

    - classification: Tensor[B, N, C], sigmoid probabilities (or logits, see ``from_logits``);
    - regression: Tensor[B, N, 4] (dy, dx, dh, dw);
    - anchors: Tensor[1, N, 4] (y1, x1, y2, x2), input pixels (as the detector returns them);
    - annotations: Tensor[B, M, 5] (x1, y1, x2, y2, class_id), input pixels, padded with rows of −1
      (class −1 = padding; M may be 0); class ids are integers in [0, C).

    Returns ``(cls_loss, reg_loss)``, 0-dim float32 tensors; ``reg_loss`` already includes
    ``box_loss_weight`` (the total training loss is ``cls_loss + reg_loss``).

    The published name ``FocalLoss`` is this class (it returns the box loss too). The published call
    ``FocalLoss()(classifications, regressions, anchors, annotations, imgs=imgs,
    obj_list=obj_list)`` works too: ``imgs`` and ``obj_list`` (the published debug drawing) are accepted and
    ignored, since the loss does not draw (``train.py --debug`` draws instead). The published loss returned
    ``Tensor[1]`` values; these 0-dim ones take the same ``.mean()``, ``.item()``, sums and ``.backward()``.
    """

    def __init__(self, formulation: str = "yaep", *, from_logits: bool = False, label_smoothing: float = 0.0,
                 box_loss_weight: float = 50.0) -> None:
        super().__init__()
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {sorted(FORMULATIONS)}, got {formulation!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if label_smoothing and formulation != "official":
            raise ValueError(f"label_smoothing={label_smoothing} is only part of the 'official' formulation, "
                             f"not {formulation!r}")
        if box_loss_weight < 0:
            raise ValueError(f"box_loss_weight must be ≥ 0, got {box_loss_weight}")
        self.formulation = formulation
        self.settings = FORMULATIONS[formulation]
        self.from_logits = bool(from_logits)
        self.label_smoothing = float(label_smoothing)
        self.box_loss_weight = float(box_loss_weight)
        if formulation == "official" and not self.from_logits:
            logger.warning("official loss fed probabilities: they are converted back to logits (clamped to "
                           "[%g, 1 - %g]); pass the logits of model(images, logits=True) with from_logits=True "
                           "for the faithful loss", LOGIT_EPS, LOGIT_EPS)

    def extra_repr(self) -> str:
        return (f"formulation={self.formulation!r}, from_logits={self.from_logits}, "
                f"label_smoothing={self.label_smoothing}, box_loss_weight={self.box_loss_weight}")

    @staticmethod
    def _check_inputs(classification: Tensor, regression: Tensor, anchors: Tensor, annotations: Tensor) -> None:
        if classification.dim() != 3:
            raise ValueError(f"classification must be Tensor[B, N, C], got shape {tuple(classification.shape)}")
        batch, num_anchors, num_classes = classification.shape
        if tuple(regression.shape) != (batch, num_anchors, 4):
            raise ValueError(f"regression must be Tensor[{batch}, {num_anchors}, 4] to match classification, "
                             f"got shape {tuple(regression.shape)}")
        if anchors.dim() != 3 or anchors.shape[1:] != (num_anchors, 4):
            raise ValueError(f"anchors must be Tensor[1, {num_anchors}, 4], got shape {tuple(anchors.shape)}")
        if annotations.dim() != 3 or annotations.shape[0] != batch or annotations.shape[2] != 5:
            raise ValueError(f"annotations must be Tensor[{batch}, M, 5], got shape {tuple(annotations.shape)}")
        labels = annotations[..., 4]
        bad = (labels != -1) & ((labels < 0) | (labels >= num_classes) | (labels != labels.round()))
        if bool(bad.any()):
            raise ValueError(f"annotation class ids must be integers in [0, {num_classes}) or -1 (padding), "
                             f"got {labels[bad].unique().tolist()}")

    def forward(self, classification: Tensor, regression: Tensor, anchors: Tensor, annotations: Tensor, *,
                imgs: Optional[Tensor] = None, obj_list: Optional[Sequence[str]] = None) -> Tuple[Tensor, Tensor]:
        del imgs, obj_list  # the published debug-drawing arguments: accepted, unused (the loss does not draw)
        self._check_inputs(classification, regression, anchors, annotations)
        dtype = torch.promote_types(torch.promote_types(classification.dtype, regression.dtype), torch.float32)
        classification = classification.to(dtype)
        regression = regression.to(dtype)
        anchor = anchors[0].to(dtype)                                             # [N, 4] (y1, x1, y2, x2)
        annotations = annotations.to(dtype)
        batch, num_anchors, num_classes = classification.shape

        matched, positive, negative = match_anchors(anchor, annotations, self.settings)   # [B, N] each
        if annotations.shape[1] == 0:  # gathering needs one row: a padding row is never matched
            annotations = annotations.new_full((batch, 1, 5), -1.0)
        assigned = torch.gather(annotations, 1, matched[..., None].expand(-1, -1, 5))       # [B, N, 5]

        # One-hot targets: 1 at the matched class of positive anchors, 0 elsewhere.
        labels = assigned[..., 4].long().clamp(min=0)                             # [B, N]
        targets = torch.zeros_like(classification)
        targets.scatter_(2, labels[..., None], positive[..., None].to(dtype))

        # Box targets for every anchor (used only where positive).
        gt = assigned[..., [1, 0, 3, 2]].reshape(-1, 4)                           # (y1, x1, y2, x2)
        box_targets = encode_boxes(gt, anchor.expand(batch, num_anchors, 4).reshape(-1, 4))
        box_targets = box_targets.reshape(batch, num_anchors, 4)                  # (dy, dx, dh, dw)
        diff = (box_targets - regression).abs()
        num_positive = positive.sum(dim=1).to(dtype)                              # [B]

        if self.formulation == "yaep":
            cls_loss, box_loss = self._yaep(classification, targets, positive, negative, diff, num_positive)
        else:
            cls_loss, box_loss = self._official(classification, targets, positive, box_targets, diff, num_positive)
        return cls_loss, box_loss * self.box_loss_weight

    def _yaep(self, classification: Tensor, targets: Tensor, positive: Tensor, negative: Tensor, diff: Tensor,
              num_positive: Tensor) -> Tuple[Tensor, Tensor]:
        """classification, targets: Tensor[B, N, C]; positive, negative: Tensor[B, N] bool;
        diff: Tensor[B, N, 4] |target − regression|; num_positive: Tensor[B] -> unweighted (cls, box)."""
        s = self.settings
        prob = classification.sigmoid() if self.from_logits else classification
        prob = prob.clamp(PROB_CLAMP, 1.0 - PROB_CLAMP)
        is_target = targets == 1.0
        alpha_factor = torch.where(is_target, s.alpha, 1.0 - s.alpha)
        focal_weight = alpha_factor * torch.where(is_target, 1.0 - prob, prob).pow(s.gamma)
        bce = -(targets * prob.log() + (1.0 - targets) * (1.0 - prob).log())
        cls = torch.where((positive | negative)[..., None], focal_weight * bce, 0.0)
        cls_per_image = cls.sum(dim=(1, 2)) / num_positive.clamp(min=1.0)

        beta = s.box_delta
        box = torch.where(diff <= beta, 0.5 / beta * diff.pow(2), diff - 0.5 * beta)
        box = torch.where(positive[..., None], box, 0.0)
        box_per_image = box.sum(dim=(1, 2)) / (4.0 * num_positive).clamp(min=1.0)   # 0 without positives
        return cls_per_image.mean(), box_per_image.mean()

    def _official(self, classification: Tensor, targets: Tensor, positive: Tensor, box_targets: Tensor,
                  diff: Tensor, num_positive: Tensor) -> Tuple[Tensor, Tensor]:
        """classification, targets: Tensor[B, N, C]; positive: Tensor[B, N] bool; box_targets, diff:
        Tensor[B, N, 4]; num_positive: Tensor[B] -> unweighted (cls, box)."""
        s = self.settings
        if self.from_logits:
            logits = classification
        else:
            logits = torch.logit(classification.clamp(LOGIT_EPS, 1.0 - LOGIT_EPS))
        normalizer = num_positive.sum() + 1.0
        prob = logits.sigmoid()
        p_t = targets * prob + (1.0 - targets) * (1.0 - prob)
        alpha_factor = targets * s.alpha + (1.0 - targets) * (1.0 - s.alpha)
        modulating = (1.0 - p_t).pow(s.gamma)
        smoothed = targets * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        ce = F.binary_cross_entropy_with_logits(logits, smoothed, reduction="none")
        cls_loss = (alpha_factor * modulating * ce).sum() / normalizer

        delta = s.box_delta
        huber = torch.where(diff <= delta, 0.5 * diff.pow(2), delta * diff - 0.5 * delta ** 2)
        mask = positive[..., None] & (box_targets != 0.0)
        box_loss = torch.where(mask, huber, 0.0).sum() / (4.0 * normalizer)
        return cls_loss, box_loss


#: The published name (``from efficientdet.loss import FocalLoss``): the same class, which returns both losses.
FocalLoss = DetectionLoss
