"""Anchors and box coding, as published (DEVELOPING.md, Faithfulness).

Box notation used throughout the project:

- anchors and the network's box space: ``(y1, x1, y2, x2)`` in input pixels;
- regression: ``(dy, dx, dh, dw)`` relative to an anchor;
- decoded detections: ``(x1, y1, x2, y2)`` in input pixels (the format every consumer uses).
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

DEFAULT_SCALES: Tuple[float, ...] = (2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0))
DEFAULT_RATIOS: Tuple[Tuple[float, float], ...] = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
# The official TF anchors: aspect ratios [1.0, 2.0, 0.5] as (sqrt(r), 1 / sqrt(r)) width/height stretches.
OFFICIAL_RATIOS: Tuple[Tuple[float, float], ...] = ((1.0, 1.0), (2 ** 0.5, 2 ** -0.5), (2 ** -0.5, 2 ** 0.5))


def anchor_sizes(anchor_scale: float, stride: int, scales: Sequence[float],
                 ratios: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """(width, height) in input pixels of the anchors of one level, ``anchor_scale · stride · scale · (rx, ry)``,
    in the :class:`Anchors` order (scale varying slowest)."""
    return [(anchor_scale * stride * s * r[0], anchor_scale * stride * s * r[1])
            for s, r in itertools.product(scales, ratios)]


class Anchors(nn.Module):
    """Anchor boxes for every pyramid level, position and (scale, ratio) pair.

    Order: level by level (lowest first), positions row-major, then ``scales × ratios`` with the
    scale varying slowest. A ratio ``(rx, ry)`` stretches the width by ``rx`` and the height by ``ry``.

    Anchors are computed in float64 and cached per (input size, device, dtype).
    """

    def __init__(self, anchor_scale: float = 4.0, pyramid_levels: Sequence[int] = (3, 4, 5, 6, 7),
                 scales: Sequence[float] = DEFAULT_SCALES,
                 ratios: Sequence[Tuple[float, float]] = DEFAULT_RATIOS) -> None:
        super().__init__()
        self.anchor_scale = float(anchor_scale)
        self.pyramid_levels = tuple(int(level) for level in pyramid_levels)
        self.strides = tuple(2 ** level for level in self.pyramid_levels)
        self.scales = tuple(float(s) for s in scales)
        self.ratios = tuple((float(r[0]), float(r[1])) for r in ratios)
        self._cache: Dict[Tuple[int, int, torch.device, torch.dtype], Tensor] = {}

    @property
    def num_anchors(self) -> int:
        """Anchors per position."""
        return len(self.scales) * len(self.ratios)

    def generate(self, height: int, width: int) -> Tensor:
        """Anchors for an input of ``height × width``: Tensor[N, 4] (y1, x1, y2, x2), float64, input pixels."""
        levels = []
        for stride in self.strides:
            ys = torch.arange(stride / 2, height, stride, dtype=torch.float64)
            xs = torch.arange(stride / 2, width, stride, dtype=torch.float64)
            yc, xc = torch.meshgrid(ys, xs, indexing="ij")
            yc, xc = yc.reshape(-1, 1), xc.reshape(-1, 1)
            sizes = anchor_sizes(self.anchor_scale, stride, self.scales, self.ratios)
            half_w = torch.tensor([w / 2.0 for w, _ in sizes], dtype=torch.float64)
            half_h = torch.tensor([h / 2.0 for _, h in sizes], dtype=torch.float64)
            boxes = torch.stack((yc - half_h, xc - half_w, yc + half_h, xc + half_w), dim=-1)
            levels.append(boxes.reshape(-1, 4))
        return torch.cat(levels, dim=0)

    def forward(self, image: Tensor) -> Tensor:
        """image: Tensor[B, C, H, W] -> anchors Tensor[1, N, 4] (y1, x1, y2, x2), input pixels,
        on the image's device and in its (floating) dtype."""
        height, width = int(image.shape[-2]), int(image.shape[-1])
        dtype = image.dtype if image.dtype.is_floating_point else torch.float32
        key = (height, width, image.device, dtype)
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = self.generate(height, width).to(device=image.device, dtype=dtype).unsqueeze(0)
            self._cache[key] = anchors
        return anchors


class BBoxTransform(nn.Module):
    """Decode regression deltas against anchors into boxes."""

    def forward(self, anchors: Tensor, regression: Tensor) -> Tensor:
        """anchors: Tensor[1 or B, N, 4] (y1, x1, y2, x2); regression: Tensor[B, N, 4] (dy, dx, dh, dw)
        -> Tensor[B, N, 4] (x1, y1, x2, y2), input pixels."""
        # The y and x halves side by side: the published per-coordinate arithmetic, in half the operations.
        center = (anchors[..., 0:2] + anchors[..., 2:4]) / 2  # (ya, xa)
        size = anchors[..., 2:4] - anchors[..., 0:2]  # (ha, wa)
        half = regression[..., 2:4].exp() * size / 2.0  # (h / 2, w / 2)
        middle = regression[..., 0:2] * size + center  # (yc, xc)
        low, high = middle - half, middle + half  # (y1, x1), (y2, x2)
        return torch.stack((low[..., 1], low[..., 0], high[..., 1], high[..., 0]), dim=-1)


class ClipBoxes(nn.Module):
    """Clip boxes to the network input: x to [0, W − 1], y to [0, H − 1]."""

    def forward(self, boxes: Tensor, image: Tensor) -> Tensor:
        """boxes: Tensor[B, N, 4] (x1, y1, x2, y2); image: Tensor[B, C, H, W] -> clipped copy."""
        height, width = image.shape[-2], image.shape[-1]
        limits = torch.tensor([width - 1, height - 1], dtype=boxes.dtype, device=boxes.device)
        return torch.cat((boxes[..., 0:2].clamp(min=0), torch.minimum(boxes[..., 2:4], limits)), dim=-1)


def encode_boxes(gt: Tensor, anchors: Tensor) -> Tensor:
    """Regression targets (the inverse of :class:`BBoxTransform`, as the published loss computes them).

    gt: Tensor[M, 4] (y1, x1, y2, x2); anchors: Tensor[M, 4] (y1, x1, y2, x2), both input pixels,
    paired row by row -> Tensor[M, 4] (dy, dx, dh, dw). GT width and height are clamped to ≥ 1.
    """
    ha = anchors[:, 2] - anchors[:, 0]
    wa = anchors[:, 3] - anchors[:, 1]
    ya = anchors[:, 0] + 0.5 * ha
    xa = anchors[:, 1] + 0.5 * wa
    h = (gt[:, 2] - gt[:, 0]).clamp(min=1)
    w = (gt[:, 3] - gt[:, 1]).clamp(min=1)
    y = gt[:, 0] + 0.5 * (gt[:, 2] - gt[:, 0])
    x = gt[:, 1] + 0.5 * (gt[:, 3] - gt[:, 1])
    return torch.stack(((y - ya) / ha, (x - xa) / wa, torch.log(h / ha), torch.log(w / wa)), dim=1)
