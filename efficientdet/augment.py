"""Training augmentations beyond the published flip and scale jitter, each off by default, and the builder of
the whole training pipeline (:func:`build_transform`).

Where each one acts (the order of :func:`build_transform`; see :mod:`efficientdet.transforms`):

1. :class:`Mosaic` (``mosaic`` probability), at dataset level (``CocoDataset(mosaic=...)``): four images, the
   sample's own and three drawn from its generator, on one ``S × S`` canvas, RGB in [0, 1]; the rest of the
   pipeline then transforms the mosaic as one image.
2. :class:`ColorJitter` (``hsv_h``, ``hsv_s``, ``hsv_v``): HSV gains on the RGB image in [0, 1], before the
   normalisation (the gains are defined on colours, not on normalised values).
3. ``Normalizer``, then ``HorizontalFlip`` (published), then :class:`VerticalFlip` (``vflip`` probability).
4. :class:`RandomAffine` (``affine_scale``, ``affine_translate``, ``affine_rotate``) on the normalised image at
   its size: the border is filled with 0, the mean colour, as the ``Resizer``'s padding.
5. ``Resizer`` or ``RandomScaleCrop`` (``scale_jitter``) to the input size.

Boxes are ``np.ndarray[N, 5] (x1, y1, x2, y2, class)`` in pixels of the current image (pixel edges: the image
spans ``[0, W] × [0, H]``); an image without boxes has ``np.ndarray[0, 5]``. Geometric augmentations map the
box corners exactly, clip the boxes to the image and drop those keeping under :data:`MIN_AREA_KEPT` of their
area or narrower / lower than ``MIN_BOX_SIZE`` (:func:`clip_boxes`). Every draw comes from the generator handed
in (the dataset's ``default_rng([seed, epoch, index])``), so a sample is the same whatever the workers.
"""
from __future__ import annotations

import math
from typing import List, Mapping, NamedTuple, Optional, Protocol, Sequence, Tuple

import cv2
import numpy as np

from efficientdet.transforms import (CANVAS_DTYPE, MIN_BOX_SIZE, Compose, HorizontalFlip, Normalizer,
                                     RandomScaleCrop, Resizer, Sample, Transform, _generator, letterbox_size)

#: A box cut by the image border is kept when at least this fraction of its area stays inside.
MIN_AREA_KEPT = 0.2
#: The augmentation settings (``train.py`` flags, :func:`build_transform` / ``create_dataloaders`` keywords).
AUGMENT_SETTINGS = ("vflip", "mosaic", "hsv_h", "hsv_s", "hsv_v", "affine_scale", "affine_translate", "affine_rotate")
#: Upper bounds (inclusive, except ``affine_scale``) of each setting; all are >= 0.
_LIMITS = {"vflip": 1.0, "mosaic": 1.0, "hsv_h": 0.5, "hsv_s": 1.0, "hsv_v": 1.0, "affine_scale": 1.0,
           "affine_translate": 1.0, "affine_rotate": 180.0}


def check_augmentations(settings: Mapping[str, float], prefix: str = "") -> None:
    """ValueError naming the setting (``prefix`` + name, e.g. ``--vflip``) and its value unless it is a number
    in range: ``vflip``, ``mosaic`` probabilities in [0, 1]; ``hsv_h`` in [0, 0.5] (a fraction of the hue
    circle); ``hsv_s``, ``hsv_v``, ``affine_translate`` in [0, 1]; ``affine_scale`` in [0, 1); ``affine_rotate``
    in [0, 180] degrees. Unknown names are a ValueError too."""
    for name, value in settings.items():
        if name not in _LIMITS:
            raise ValueError(f"unknown augmentation setting {prefix}{name}; known: {', '.join(AUGMENT_SETTINGS)}")
        limit = _LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{prefix}{name} must be a number, got {value!r}")
        if value < 0 or value > limit or (name == "affine_scale" and value >= limit):
            upper = "1)" if name == "affine_scale" else f"{limit:g}]"
            raise ValueError(f"{prefix}{name} must be in [0, {upper}, got {value}")


def clip_boxes(annot: np.ndarray, width: float, height: float, min_area_kept: float = MIN_AREA_KEPT,
               min_box_size: float = MIN_BOX_SIZE) -> np.ndarray:
    """Boxes ``np.ndarray[N, 5] (x1, y1, x2, y2, class)`` clipped to ``[0, width] × [0, height]``, keeping
    those whose clipped area is at least ``min_area_kept`` times their area before clipping and whose clipped
    sides are at least ``min_box_size``; ``np.ndarray[M, 5] float32``, M <= N."""
    annot = np.asarray(annot, dtype=np.float32).reshape(-1, 5)
    area = (annot[:, 2] - annot[:, 0]) * (annot[:, 3] - annot[:, 1])
    clipped = annot.copy()
    clipped[:, [0, 2]] = np.clip(annot[:, [0, 2]], 0.0, float(width))
    clipped[:, [1, 3]] = np.clip(annot[:, [1, 3]], 0.0, float(height))
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (w >= min_box_size) & (h >= min_box_size) & (w * h >= min_area_kept * area)
    return clipped[keep]


class VerticalFlip:
    """Mirror the image top-bottom with probability ``p``; boxes ``y1' = H - y2``, ``y2' = H - y1``."""

    def __init__(self, p: float = 0.5) -> None:
        check_augmentations({"vflip": p})
        self.p = float(p)

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None) -> Sample:
        if _generator(rng).random() >= self.p:
            return sample
        image, annot = sample["img"], sample["annot"].copy()
        height = image.shape[0]
        sample["img"] = np.ascontiguousarray(image[::-1])
        y1 = annot[:, 1].copy()
        annot[:, 1] = height - annot[:, 3]
        annot[:, 3] = height - y1
        sample["annot"] = annot
        return sample


def jitter_hsv(image: np.ndarray, hue_shift: float, saturation_gain: float, value_gain: float) -> np.ndarray:
    """RGB ``np.ndarray[H, W, 3]`` in [0, 1] -> the same with hue ``+ hue_shift`` (a fraction of the circle,
    wrapped), saturation ``· saturation_gain`` and value ``· value_gain`` (both clipped to [0, 1]); float32."""
    hsv = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.float32), cv2.COLOR_RGB2HSV)  # H in [0, 360)
    hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(360.0 * hue_shift), np.float32(360.0))
    hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(saturation_gain), 0.0, 1.0)
    hsv[..., 2] = np.clip(hsv[..., 2] * np.float32(value_gain), 0.0, 1.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


class ColorJitter:
    """Random HSV gains (as YOLO's ``hsv_h``, ``hsv_s``, ``hsv_v``): hue shifted by a fraction ``U(-hsv_h, hsv_h)``
    of the circle, saturation and value multiplied by ``U(1 - hsv_s, 1 + hsv_s)`` and ``U(1 - hsv_v, 1 + hsv_v)``.

    Acts on the RGB image in [0, 1] (before ``Normalizer``); boxes and size untouched. Three draws per call.
    """

    def __init__(self, hsv_h: float = 0.0, hsv_s: float = 0.0, hsv_v: float = 0.0) -> None:
        check_augmentations({"hsv_h": hsv_h, "hsv_s": hsv_s, "hsv_v": hsv_v})
        self.gains = np.array([hsv_h, hsv_s, hsv_v], dtype=np.float64)

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None) -> Sample:
        hue, saturation, value = _generator(rng).uniform(-1.0, 1.0, size=3) * self.gains
        sample["img"] = jitter_hsv(sample["img"], hue, 1.0 + saturation, 1.0 + value)
        return sample


class AffineParams(NamedTuple):
    """One draw of :class:`RandomAffine`: ``scale`` factor, translation ``(tx, ty)`` in pixels, ``angle`` in
    degrees (counter-clockwise as displayed, ``cv2.getRotationMatrix2D``), about the image centre."""

    scale: float = 1.0
    tx: float = 0.0
    ty: float = 0.0
    angle: float = 0.0


def affine_matrix(params: AffineParams, width: int, height: int) -> np.ndarray:
    """``np.ndarray[2, 3]`` float64 mapping pixel-edge coordinates ``(x, y, 1)`` of the input to the output:
    rotation by ``angle`` and scaling by ``scale`` about ``(W / 2, H / 2)``, then the translation."""
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), float(params.angle), float(params.scale))
    matrix[:, 2] += (params.tx, params.ty)
    return matrix


def affine(sample: Sample, params: AffineParams, min_area_kept: float = MIN_AREA_KEPT) -> Sample:
    """``sample`` warped by :func:`affine_matrix` (``params``) onto a canvas of its size, border 0, bilinear.

    Boxes: the 4 corners mapped, their bounding box (exact for ``angle`` 0, where boxes stay axis-aligned),
    then :func:`clip_boxes`. The sample's ``scale`` is multiplied by ``params.scale``.
    """
    image = sample["img"]
    height, width = image.shape[:2]
    matrix = affine_matrix(params, width, height)
    # cv2 addresses pixel centres (index i sits at edge coordinate i + 0.5): the same map in index coordinates
    warp = matrix.copy()
    warp[:, 2] += matrix[:, :2] @ np.array([0.5, 0.5]) - 0.5
    sample["img"] = cv2.warpAffine(image, warp, (width, height), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=(0.0, 0.0, 0.0, 0.0))
    annot = np.asarray(sample["annot"], dtype=np.float64).reshape(-1, 5)
    corners = annot[:, [0, 1, 2, 1, 0, 3, 2, 3]].reshape(-1, 4, 2)  # (x1,y1) (x2,y1) (x1,y2) (x2,y2)
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]
    boxes = np.concatenate([mapped.min(axis=1), mapped.max(axis=1), annot[:, 4:]], axis=1)
    sample["annot"] = clip_boxes(boxes, width, height, min_area_kept)
    sample["scale"] = float(sample.get("scale", 1.0)) * float(params.scale)
    return sample


class RandomAffine:
    """Random scale ``U(1 - scale, 1 + scale)``, translation ``U(-translate, translate)`` × width / height and
    rotation ``U(-rotate, rotate)`` degrees (0: none) about the image centre (:func:`affine`).

    Four draws per call, in that order (scale, tx, ty, angle). Apply it to the normalised image (the border
    fill 0 is the mean colour there).
    """

    def __init__(self, scale: float = 0.0, translate: float = 0.0, rotate: float = 0.0,
                 min_area_kept: float = MIN_AREA_KEPT) -> None:
        check_augmentations({"affine_scale": scale, "affine_translate": translate, "affine_rotate": rotate})
        self.scale, self.translate, self.rotate = float(scale), float(translate), float(rotate)
        self.min_area_kept = float(min_area_kept)

    def draw(self, rng: np.random.Generator, width: int, height: int) -> AffineParams:
        """The parameters of one call for a ``width × height`` image."""
        scale = rng.uniform(1.0 - self.scale, 1.0 + self.scale)
        tx, ty = rng.uniform(-self.translate, self.translate, size=2) * (width, height)
        angle = rng.uniform(-self.rotate, self.rotate)
        return AffineParams(float(scale), float(tx), float(ty), float(angle))

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None) -> Sample:
        height, width = sample["img"].shape[:2]
        return affine(sample, self.draw(_generator(rng), width, height), self.min_area_kept)


class SampleSource(Protocol):
    """What :class:`Mosaic` reads of a dataset (:class:`efficientdet.dataset.CocoDataset`): its length and
    untransformed samples (RGB in [0, 1], original size)."""

    def __len__(self) -> int: ...

    def raw_sample(self, index: int) -> Sample: ...


class Mosaic:
    """Four images on one ``size × size`` canvas, with probability ``p``.

    The canvas is the central ``S × S`` window of a ``2S × 2S`` mosaic whose four tiles meet at a centre uniform
    in its middle half, i.e. at a point ``(cx, cy)`` of the canvas uniform in ``[0, S]²`` (a crop, so that objects
    keep the scale of a resized image): each image is resized so that its longer side is ``S`` (as ``Resizer``,
    boxes times that scale) and placed with its bottom-right (the sample's own, tile 0), bottom-left (1),
    top-right (2) and top-left (3) corner at ``(cx, cy)``; what the tiles leave is ``fill`` (RGB in [0, 1]: the
    project's mean colour, 0 once normalised). Boxes are cut to the canvas by :func:`clip_boxes`. The sample keeps
    its ``image_id``; its ``scale`` is tile 0's.

    Call ``mosaic(sample, rng, source)`` on the untransformed sample (RGB in [0, 1]): one draw decides; when it
    applies, three indices of ``source`` and the centre follow from the same ``rng``. :meth:`combine` is the
    deterministic part.
    """

    def __init__(self, p: float, size: int, fill: Sequence[float] = (0.0, 0.0, 0.0),
                 min_area_kept: float = MIN_AREA_KEPT) -> None:
        check_augmentations({"mosaic": p})
        if int(size) <= 0 or len(fill) != 3:
            raise ValueError(f"Mosaic: size must be positive and fill hold 3 values, got {size}, {list(fill)}")
        self.p, self.size, self.min_area_kept = float(p), int(size), float(min_area_kept)
        self.fill = tuple(float(v) for v in fill)

    def __call__(self, sample: Sample, rng: np.random.Generator, source: SampleSource) -> Sample:
        if rng.random() >= self.p:
            return sample
        others = [source.raw_sample(int(i)) for i in rng.integers(0, len(source), size=3)]
        cx, cy = rng.uniform(0.0, self.size, size=2)
        return self.combine([sample] + others, (int(cx), int(cy)))

    def combine(self, samples: Sequence[Sample], centre: Tuple[int, int]) -> Sample:
        """The mosaic of 4 untransformed samples meeting at ``centre = (cx, cy)`` (canvas pixels)."""
        if len(samples) != 4:
            raise ValueError(f"Mosaic: needs 4 samples, got {len(samples)}")
        size, (cx, cy) = self.size, (int(centre[0]), int(centre[1]))
        canvas = np.empty((size, size, 3), dtype=CANVAS_DTYPE)
        canvas[...] = self.fill
        boxes: List[np.ndarray] = []
        scales: List[float] = []
        for tile, sample in enumerate(samples):
            image = sample["img"]
            new_h, new_w, scale = letterbox_size(image.shape[0], image.shape[1], size)
            if (new_h, new_w) != image.shape[:2]:
                image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            x0 = cx - new_w if tile in (0, 2) else cx
            y0 = cy - new_h if tile in (0, 1) else cy
            left, top, right, bottom = max(x0, 0), max(y0, 0), min(x0 + new_w, size), min(y0 + new_h, size)
            if right > left and bottom > top:
                canvas[top:bottom, left:right] = image[top - y0:bottom - y0, left - x0:right - x0]
            annot = np.asarray(sample["annot"], dtype=np.float32).reshape(-1, 5).copy()
            annot[:, :4] *= scale
            annot[:, [0, 2]] += x0
            annot[:, [1, 3]] += y0
            boxes.append(annot)
            scales.append(scale)
        annot = clip_boxes(np.concatenate(boxes), size, size, self.min_area_kept)
        return {"img": canvas, "annot": annot, "scale": float(samples[0].get("scale", 1.0)) * scales[0],
                "image_id": samples[0].get("image_id", -1)}


def build_transform(input_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                    flip: bool = True, scale_jitter: bool = False,
                    jitter_range: Tuple[float, float] = (0.1, 2.0), flip_p: float = 0.5, *, vflip: float = 0.0,
                    hsv_h: float = 0.0, hsv_s: float = 0.0, hsv_v: float = 0.0, affine_scale: float = 0.0,
                    affine_translate: float = 0.0, affine_rotate: float = 0.0) -> Compose:
    """The sample pipeline: [:class:`ColorJitter`], ``Normalizer``, [``HorizontalFlip``], [:class:`VerticalFlip`],
    [:class:`RandomAffine`], ``RandomScaleCrop`` (``scale_jitter``) or ``Resizer``.

    A bracketed step is there only in training and when switched on (``flip``; the others when their setting is
    above 0), so the defaults give the published pipeline, draw for draw. ``train=False`` ignores every
    augmentation (validation: normalise + resize only). Mosaic is not a transform (:class:`Mosaic`).
    Raises ValueError for a setting out of range (:func:`check_augmentations`).
    """
    check_augmentations({"vflip": vflip, "hsv_h": hsv_h, "hsv_s": hsv_s, "hsv_v": hsv_v, "affine_scale": affine_scale,
                         "affine_translate": affine_translate, "affine_rotate": affine_rotate})
    transforms: List[Transform] = []
    if train and (hsv_h or hsv_s or hsv_v):
        transforms.append(ColorJitter(hsv_h, hsv_s, hsv_v))
    transforms.append(Normalizer(mean, std))
    if train and flip:
        transforms.append(HorizontalFlip(flip_p))
    if train and vflip:
        transforms.append(VerticalFlip(vflip))
    if train and (affine_scale or affine_translate or affine_rotate):
        transforms.append(RandomAffine(affine_scale, affine_translate, affine_rotate))
    if train and scale_jitter:
        transforms.append(RandomScaleCrop(input_size, jitter_range))
    else:
        transforms.append(Resizer(input_size))
    return Compose(transforms)
