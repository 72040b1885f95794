"""The one image pipeline: the pixel arithmetic and geometry of training samples and of inference
inputs (:mod:`utils.inference.preprocess` calls :func:`to_unit_rgb`, :func:`normalize` and :func:`letterbox` from here).

One dtype: the pixel arithmetic (/ 255, normalise, resize) is float64 (:data:`PIXEL_DTYPE`) and the canvas,
the network's input, float32 (:data:`CANVAS_DTYPE`), in training and in inference: the published inference
``preprocess`` bit for bit, and the published training ``Normalizer``/``Resizer`` (float64 after
normalising). The one float32 step left is the published loader's raw image (``CocoDataset.load_image``
returns ``to_unit_rgb(image)`` stored as float32, as published, for users who call it), so a training
sample without augmentation equals the detector's input for the same image up to that rounding (< 2e-7),
except for a square image whose side truncates (below). One geometry: :func:`letterbox` (aspect-preserving,
``int()``-truncated sides from :func:`resized_shape`, bilinear, top-left on a zero canvas), with the published
tie rule of each side: a square image on a square canvas is fitted by its height at inference
(:data:`FIT_TIES_INFERENCE`, the published ``aspectaware_resize_padding``) and by its width in training
(:data:`FIT_TIES_TRAINING`, the published ``Resizer``); e.g. 425 × 425 at 512 is 511 wide × 512 high in the
detector's input and 512 wide × 511 high in a training sample, as published.

The sample pipeline is the published one: BGR -> RGB, / 255, ``Normalizer`` (mean, std), then
``HorizontalFlip`` (training), then ``Resizer`` (aspect-preserving resize so the longer side is the input
size, pasted at the top-left of a zero canvas; a square image fitted by its width) or, with scale
jitter, ``RandomScaleCrop`` (the official recipe: random scale 0.1-2.0 of the output size, random crop,
zero padding at the bottom/right). Without a transform a sample holds the RGB image in [0, 1] at its
original size (``scale`` 1.0).

The optional augmentations (:mod:`efficientdet.augment`, each off by default) fit in this order, which
:func:`efficientdet.augment.build_transform` assembles: mosaic (at dataset level, on the RGB images in
[0, 1], before any transform) -> colour jitter (HSV gains on the RGB image in [0, 1], so before the
``Normalizer``) -> ``Normalizer`` -> horizontal flip -> vertical flip -> random affine (on the normalised
image, border 0 = the mean colour) -> ``Resizer`` / ``RandomScaleCrop``. With every one off the pipeline is
the published one above, draw for draw.

Randomness: every transform draws from a ``numpy.random.Generator`` handed to it. With ``seed`` set, the
dataset gives sample ``index`` the generator ``default_rng([seed, epoch, index])``: the same augmentation
whatever the worker, the number of workers or the order of loading (call :meth:`CocoDataset.set_epoch`
each epoch; DataLoader workers get a fresh copy of the dataset at each epoch unless
``persistent_workers=True``). Without a seed each sample gets fresh OS entropy (never the duplicated
numpy global state of forked workers).
"""
from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import cv2
import numpy as np


Sample = Dict[str, Any]
#: Our transforms: ``transform(sample, rng) -> sample`` (``rng`` optional on the classes of this module).
Transform = Callable[[Sample, np.random.Generator], Sample]
#: The published convention: ``transform(sample) -> sample`` (e.g. ``torchvision.transforms.Compose``).
PublishedTransform = Callable[[Sample], Sample]

#: Boxes narrower or lower than this (pixels) are dropped, at loading and after jitter + crop.
MIN_BOX_SIZE = 1.0

#: The dtype of the pixel arithmetic (/ 255, normalise, resize), in training and in inference.
PIXEL_DTYPE = np.float64
#: The dtype of the canvas: the network's input.
CANVAS_DTYPE = np.float32
#: ImageNet's RGB mean and std in [0, 1] units: the published defaults (projects set their own).
DEFAULT_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
DEFAULT_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


#: The tie rule of the published INFERENCE pre-processing (``aspectaware_resize_padding``: ``if old_w > old_h``
#: fit the width, else the height): a square image on a square canvas is fitted by its height.
FIT_TIES_INFERENCE = "height"
#: The tie rule of the published TRAINING ``Resizer`` (``if height > width`` fit the height, else the width): a
#: square image on a square canvas is fitted by its width.
FIT_TIES_TRAINING = "width"
FIT_TIES = (FIT_TIES_INFERENCE, FIT_TIES_TRAINING)


def resized_shape(old_h: int, old_w: int, canvas_h: int, canvas_w: int, *, fit_ties_by: str) -> Tuple[int, int]:
    """(new_h, new_w) of the aspect-preserving fit, as the published code rounds it (``int()`` truncation).

    The limiting side fills the canvas, the other is ``int(canvas_w / old_w · old_h)`` (width fit) or
    ``int(canvas_h / old_h · old_w)`` (height fit). When neither limits (the image has the canvas's aspect:
    a square image on a square canvas) ``fit_ties_by`` decides: ``"height"`` (:data:`FIT_TIES_INFERENCE`) or
    ``"width"`` (:data:`FIT_TIES_TRAINING`). The two differ where the division truncates, e.g. 425 × 425 at
    512: height fit 511 wide × 512 high, width fit 512 wide × 511 high. A side that truncates to 0 (an
    image more than ``canvas`` times longer than wide) is 1 (the published code fails there).
    """
    if fit_ties_by not in FIT_TIES:
        raise ValueError(f"fit_ties_by must be one of {FIT_TIES}, got {fit_ties_by!r}")
    # Integer cross-multiplication: width-limited when canvas_w / old_w < canvas_h / old_h, exactly.
    width_term, height_term = canvas_w * old_h, canvas_h * old_w
    if width_term < height_term or (width_term == height_term and fit_ties_by == FIT_TIES_TRAINING):
        new_w, new_h = canvas_w, int(canvas_w / old_w * old_h)
    else:
        new_w, new_h = int(canvas_h / old_h * old_w), canvas_h
    return max(new_h, 1), max(new_w, 1)


def to_unit_rgb(image: np.ndarray) -> np.ndarray:
    """BGR uint8 ``np.ndarray[H, W, 3]`` -> RGB ``[H, W, 3]`` :data:`PIXEL_DTYPE` in [0, 1]."""
    return image[..., ::-1] / PIXEL_DTYPE(255.0)


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    """ValueError unless ``mean`` and ``std`` hold 3 values each (R, G, B)."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 values (R, G, B), got {list(mean)} and {list(std)}")


def normalize(image: np.ndarray, mean: Sequence[float] = DEFAULT_MEAN,
              std: Sequence[float] = DEFAULT_STD) -> np.ndarray:
    """RGB ``np.ndarray[H, W, 3]`` in [0, 1] -> ``(image - mean) / std`` per channel, :data:`PIXEL_DTYPE`."""
    check_mean_std(mean, std)
    mean_ = np.asarray(mean, dtype=PIXEL_DTYPE).reshape(1, 1, 3)
    std_ = np.asarray(std, dtype=PIXEL_DTYPE).reshape(1, 1, 3)
    return ((image.astype(PIXEL_DTYPE, copy=False) - mean_) / std_).astype(PIXEL_DTYPE, copy=False)


def letterbox(image: np.ndarray, canvas_h: int, canvas_w: int, interpolation: int = cv2.INTER_LINEAR,
              fill: Union[None, float, Sequence[float]] = None, *, fit_ties_by: str) -> Tuple[np.ndarray, int, int]:
    """The geometry of training and inference: ``image`` (``[H, W]`` or ``[H, W, C]``, any dtype cv2.resize
    takes) resized to :func:`resized_shape` with the tie rule ``fit_ties_by`` (:data:`FIT_TIES_INFERENCE` for
    inference, :data:`FIT_TIES_TRAINING` for training samples; resized only when the size changes) and pasted
    at the top-left of a :data:`CANVAS_DTYPE` canvas ``[canvas_h, canvas_w, C]`` (C = 1 for ``[H, W]``) that
    is 0 elsewhere, or ``fill`` (per channel) when given.

    Returns ``(canvas, new_h, new_w)``; canvas pixels = original pixels · ``new_w / W`` (x), ``new_h / H`` (y).
    """
    old_h, old_w = image.shape[:2]
    channels = image.shape[2] if image.ndim == 3 else 1
    new_h, new_w = resized_shape(old_h, old_w, canvas_h, canvas_w, fit_ties_by=fit_ties_by)
    if (new_h, new_w) != (old_h, old_w):
        image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    canvas = np.zeros((canvas_h, canvas_w, channels), dtype=CANVAS_DTYPE)
    if fill is not None:
        canvas[...] = fill
    canvas[:new_h, :new_w] = image.reshape(new_h, new_w, channels)  # cv2.resize drops a single channel
    return canvas, new_h, new_w


def letterbox_size(height: int, width: int, size: int,
                   fit_ties_by: str = FIT_TIES_TRAINING) -> Tuple[int, int, float]:
    """Size of an image resized so that its longer side is ``size``, keeping its aspect (the training
    :class:`Resizer`'s geometry by default).

    Returns ``(new_height, new_width, scale)`` with ``scale = size / max(height, width)``; the sides are
    those of :func:`resized_shape` with ``fit_ties_by`` (they differ between the two tie rules only for a
    square image whose side truncates; ``scale`` never does). Boxes scale by ``scale``.
    """
    if height <= 0 or width <= 0 or size <= 0:
        raise ValueError(f"letterbox_size: sides must be positive, got height={height}, width={width}, size={size}")
    new_h, new_w = resized_shape(height, width, size, size, fit_ties_by=fit_ties_by)
    return new_h, new_w, size / max(height, width)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv2 bilinear resize of ``np.ndarray[H, W, 3]`` to ``[height, width, 3]`` (no-op when equal)."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def _generator(rng: Optional[np.random.Generator]) -> np.random.Generator:
    """``rng``, or a fresh generator (OS entropy) for the published one-argument call ``t(sample)``."""
    return rng if rng is not None else np.random.default_rng()


def takes_rng(transform: Callable[..., Sample]) -> bool:
    """Whether ``transform`` is called as ``transform(sample, rng)`` rather than ``transform(sample)``.

    True where its second positional parameter is named ``rng`` (the transforms of this module) or has no
    default (``lambda sample, rng: ...``); False for one-parameter callables (the published transforms,
    ``torchvision.transforms.Compose``), for a second parameter with a default under another name (the
    published ``Augmenter.__call__(sample, flip_x=0.5)``) and where no signature can be read.
    """
    try:
        parameters = list(inspect.signature(transform).parameters.values())
    except (TypeError, ValueError):  # builtins and C extensions without a readable signature
        return False
    positional = [p for p in parameters
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2:
        return False
    return positional[1].name == "rng" or positional[1].default is inspect.Parameter.empty


def apply_transform(transform: Union[Transform, PublishedTransform], sample: Sample,
                    rng: Optional[np.random.Generator] = None) -> Sample:
    """``transform(sample, rng)`` where it takes a generator (:func:`takes_rng`), else ``transform(sample)``."""
    return transform(sample, _generator(rng)) if takes_rng(transform) else transform(sample)


class Normalizer:
    """``(img - mean) / std`` per RGB channel (:func:`normalize`, float64 as the published ``Normalizer(mean=, std=)``)."""

    def __init__(self, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD) -> None:
        self.mean = np.asarray(mean, dtype=PIXEL_DTYPE).reshape(1, 1, 3)
        self.std = np.asarray(std, dtype=PIXEL_DTYPE).reshape(1, 1, 3)

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None) -> Sample:
        sample["img"] = normalize(sample["img"], self.mean.ravel(), self.std.ravel())
        return sample


class HorizontalFlip:
    """Mirror the image left-right with probability ``p``; boxes ``x1' = W - x2``, ``x2' = W - x1``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"HorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None) -> Sample:
        return self._flip(sample, _generator(rng), self.p)

    @staticmethod
    def _flip(sample: Sample, rng: np.random.Generator, p: float) -> Sample:
        if rng.random() >= p:
            return sample
        image, annot = sample["img"], sample["annot"]
        width = image.shape[1]
        sample["img"] = np.ascontiguousarray(image[:, ::-1, :])
        annot = annot.copy()
        x1 = annot[:, 0].copy()
        annot[:, 0] = width - annot[:, 2]
        annot[:, 2] = width - x1
        sample["annot"] = annot
        return sample


class Augmenter(HorizontalFlip):
    """The published ``Augmenter``: horizontal flip with probability 0.5, ``augmenter(sample, flip_x=0.5)``.

    Our :class:`HorizontalFlip` (same draws, so a seeded dataset gives the same flips with either). The
    probability is ``flip_x`` when given (keyword, or a number as the second positional argument, the
    published call), else ``p``.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)

    def __call__(self, sample: Sample, rng: Union[np.random.Generator, float, None] = None,
                 flip_x: Optional[float] = None) -> Sample:
        if isinstance(rng, numbers.Real):  # published positional call: augmenter(sample, 0.3)
            rng, flip_x = None, float(rng)
        p = self.p if flip_x is None else float(flip_x)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Augmenter: flip_x must be in [0, 1], got {flip_x}")
        return self._flip(sample, _generator(rng), p)


class Resizer:
    """Aspect-preserving resize so the longer side is ``size``, pasted top-left on a zero ``size × size`` canvas.

    The published training geometry: a square image is fitted by its width (:data:`FIT_TIES_TRAINING`;
    inference fits it by its height, as published). Boxes are multiplied by ``scale`` (stored in
    the sample); none are dropped (as the published ``Resizer``). ``img_size`` is the published keyword for
    ``size`` (``Resizer(img_size=512)``). Unlike the published one, 'img' and 'annot' stay numpy arrays
    (:func:`collater` takes either).
    """

    def __init__(self, size: int = 512, img_size: Optional[int] = None) -> None:
        if img_size is not None:
            size = img_size
        if int(size) <= 0:
            raise ValueError(f"Resizer: size must be positive, got {size}")
        self.size = int(size)

    @property
    def img_size(self) -> int:
        """The published name of :attr:`size`."""
        return self.size

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None) -> Sample:
        image = sample["img"]
        scale = letterbox_size(image.shape[0], image.shape[1], self.size)[2]
        canvas = letterbox(image, self.size, self.size, fit_ties_by=FIT_TIES_TRAINING)[0]
        annot = sample["annot"].astype(np.float32, copy=True)
        annot[:, :4] *= scale
        sample.update(img=canvas, annot=annot, scale=float(sample.get("scale", 1.0)) * scale)
        return sample


class RandomScaleCrop:
    """Random scale jitter with crop to ``size × size`` (the official recipe: 0.1–2.0).

    A factor ``f ~ U(scale_range)`` gives the target ``int(f * size)``; the image is resized by
    ``s = min(int(f * size) / H, int(f * size) / W)`` (aspect kept) to ``int(H * s) × int(W * s)``; a random
    ``size × size`` window is cropped where the scaled image is larger (offset ``int(U(0, 1) * excess)``),
    and the result is pasted top-left on a zero canvas. Boxes: ``b * s - offset``, clipped to
    ``[0, size]``; boxes narrower or lower than ``min_box_size`` after clipping are removed (the official
    code removes zero-area boxes). With ``f = 1`` this is exactly :class:`Resizer`. The sample's ``scale``
    becomes ``s`` (times any earlier scale); mapping boxes back also needs the crop offset, so evaluate
    with :class:`Resizer`.
    """

    def __init__(self, size: int = 512, scale_range: Tuple[float, float] = (0.1, 2.0),
                 min_box_size: float = MIN_BOX_SIZE) -> None:
        low, high = float(scale_range[0]), float(scale_range[1])
        if int(size) <= 0:
            raise ValueError(f"RandomScaleCrop: size must be positive, got {size}")
        if not 0.0 < low <= high:
            raise ValueError(f"RandomScaleCrop: scale_range must satisfy 0 < min <= max, got {scale_range}")
        self.size = int(size)
        self.scale_range = (low, high)
        self.min_box_size = float(min_box_size)

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None) -> Sample:
        rng = _generator(rng)
        image = sample["img"]
        height, width = image.shape[:2]
        factor = rng.uniform(*self.scale_range)
        target = max(1, int(factor * self.size))
        scale = min(target / height, target / width)
        scaled_h, scaled_w = max(1, int(height * scale)), max(1, int(width * scale))
        offset_y = int(max(0, scaled_h - self.size) * rng.uniform(0.0, 1.0))
        offset_x = int(max(0, scaled_w - self.size) * rng.uniform(0.0, 1.0))
        scaled = _resize(image, scaled_h, scaled_w)
        crop = scaled[offset_y:offset_y + self.size, offset_x:offset_x + self.size]
        canvas = np.zeros((self.size, self.size, 3), dtype=CANVAS_DTYPE)
        canvas[:crop.shape[0], :crop.shape[1]] = crop

        annot = sample["annot"].astype(np.float32, copy=True)
        annot[:, :4] *= scale
        annot[:, [0, 2]] -= offset_x
        annot[:, [1, 3]] -= offset_y
        annot[:, :4] = np.clip(annot[:, :4], 0.0, float(self.size))
        keep = ((annot[:, 2] - annot[:, 0]) >= self.min_box_size) & ((annot[:, 3] - annot[:, 1]) >= self.min_box_size)
        sample.update(img=canvas, annot=annot[keep], scale=float(sample.get("scale", 1.0)) * scale)
        return sample


class Compose:
    """Apply transforms in order: ``t(sample, rng)``, or ``t(sample)`` for one-argument (published) ones.

    ``compose(sample)`` (the published call, as ``torchvision.transforms.Compose``) draws from one fresh
    generator; ``compose(sample, rng)`` from ``rng``, shared by all transforms in order (deterministic with a
    seeded generator).
    """

    def __init__(self, transforms: Sequence[Union[Transform, PublishedTransform]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None) -> Sample:
        rng = _generator(rng)
        for transform in self.transforms:
            sample = apply_transform(transform, sample, rng)
        return sample

    def __repr__(self) -> str:
        return f"Compose({[type(t).__name__ for t in self.transforms]})"

