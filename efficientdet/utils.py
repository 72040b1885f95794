"""The published ``efficientdet.utils`` module API (zylo117 "Yet-Another-EfficientDet-Pytorch"), for scripts and
notebooks written against it::

    from efficientdet.utils import BBoxTransform, ClipBoxes, Anchors

Thin adapters over :mod:`efficientdet.anchors`, the project's one implementation of anchors and box coding:

- :class:`BBoxTransform` and :class:`ClipBoxes` are :mod:`efficientdet.anchors`'s own classes (same call,
  same result as published: ``BBoxTransform()(anchors, regression)`` -> ``Tensor[B, N, 4] (x1, y1, x2, y2)``,
  ``ClipBoxes()(boxes, image)`` clips x to ``[0, W − 1]`` and y to ``[0, H − 1]``; ours returns a clipped copy
  where the published one also wrote into ``boxes``).
- :class:`Anchors` takes the published constructor (``Anchors(anchor_scale=4., pyramid_levels=None, **kwargs)``
  with ``scales=``, ``ratios=``, ``strides=``) and ``forward(image, dtype=torch.float32)``; the anchors are
  :class:`efficientdet.anchors.Anchors`'s, value for value.

New code should import from :mod:`efficientdet.anchors`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from efficientdet.anchors import DEFAULT_RATIOS, DEFAULT_SCALES, BBoxTransform, ClipBoxes
from efficientdet.anchors import Anchors as _Anchors

__all__ = ["Anchors", "BBoxTransform", "ClipBoxes"]

PUBLISHED_PYRAMID_LEVELS = (3, 4, 5, 6, 7)
"""The published default ``pyramid_levels`` (D0–D7; D7x passes ``[3, 4, 5, 6, 7, 8]``)."""

_ANCHOR_KWARGS = ("scales", "ratios", "strides")


class Anchors(_Anchors):
    """Anchor boxes with the published constructor and call.

    Args:
        anchor_scale: base anchor size in strides (4.0; 5.0 for D7).
        pyramid_levels: levels of the feature pyramid, default ``[3, 4, 5, 6, 7]``.
        scales: anchor scales, default ``[2 ** 0, 2 ** (1 / 3), 2 ** (2 / 3)]`` (keyword, as published).
        ratios: anchor ``(width, height)`` stretches, default ``[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]`` (keyword).
        strides: one stride per level, default ``2 ** level`` (keyword).

    Any other keyword is a ValueError naming it (the published class ignored unknown keywords silently).

    ``forward(image, dtype=torch.float32)``: image ``Tensor[B, C, H, W]`` (only its size and device are used)
    -> ``Tensor[1, N, 4] (y1, x1, y2, x2)``, input pixels, in ``dtype`` on the image's device; N runs level by
    level, positions row-major, 9 anchors per position (:class:`efficientdet.anchors.Anchors`). H and W must be
    multiples of every stride (ValueError, as published). The published class returned float16 for
    ``dtype=torch.float16`` and float32 for anything else; here any floating ``dtype`` is honoured.
    """

    def __init__(self, anchor_scale: float = 4., pyramid_levels: Optional[Sequence[int]] = None,
                 **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(_ANCHOR_KWARGS))
        if unknown:
            raise ValueError(f"Anchors: unknown keyword argument(s) {unknown}; the published ones are "
                             f"{list(_ANCHOR_KWARGS)}")
        levels = PUBLISHED_PYRAMID_LEVELS if pyramid_levels is None else pyramid_levels
        super().__init__(anchor_scale, levels, scales=kwargs.get("scales", DEFAULT_SCALES),
                         ratios=kwargs.get("ratios", DEFAULT_RATIOS))
        if kwargs.get("strides") is not None:
            strides = tuple(int(s) for s in kwargs["strides"])
            if len(strides) != len(self.pyramid_levels):
                raise ValueError(f"Anchors: {len(strides)} strides {list(strides)} for "
                                 f"{len(self.pyramid_levels)} pyramid levels {list(self.pyramid_levels)}")
            self.strides = strides

    def forward(self, image: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:  # type: ignore[override]
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"Anchors: dtype must be a floating torch dtype, got {dtype!r}")
        height, width = int(image.shape[-2]), int(image.shape[-1])
        for stride in self.strides:
            if height % stride or width % stride:
                raise ValueError(f"Anchors: input size {height}x{width} (HxW) must be divisible by every stride "
                                 f"{list(self.strides)}")
        # efficientdet.anchors.Anchors reads only the size, device and dtype of its argument (and caches on them).
        return super().forward(image.new_empty((0, 0, height, width), dtype=dtype))
