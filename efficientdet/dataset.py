"""COCO-format detection data: loading with validation, augmentation, batching (SPEC §3, §6, §8).

Layout (the published one, ``root`` = ``--data_path/PROJECT``)::

    root/annotations/instances_<set_name>.json
    root/<set_name>/<file_name>

Classes: ``label = category_id - 1`` indexes the project's ``obj_list`` (``''`` marks an unused id).
Annotations: crowd boxes skipped, boxes under 1 px dropped, boxes crossing the image border clipped to it
(see :class:`CocoDataset`); COCO ``[x, y, w, h]`` becomes ``(x1, y1, x2, y2)``.

A sample is a dict::

    {'img':      np.ndarray[S, S, 3] float32, RGB, normalised ((x / 255 - mean) / std), zero padding,
     'annot':    np.ndarray[M, 5] float32 (x1, y1, x2, y2, label), pixels of 'img',
     'scale':    float, 'img' pixels per original image pixel,
     'image_id': int, the COCO image id}

The image pipeline is the published one: BGR -> RGB, / 255, ``Normalizer`` (mean, std), then
``HorizontalFlip`` (training), then ``Resizer`` (aspect-preserving resize so the longer side is the input
size, pasted at the top-left of a zero canvas: the geometry of inference pre-processing) or, with scale
jitter, ``RandomScaleCrop`` (the official recipe: random scale 0.1-2.0 of the output size, random crop,
zero padding at the bottom/right). Without a transform a sample holds the RGB image in [0, 1] at its
original size (``scale`` 1.0).

Randomness: every transform draws from a ``numpy.random.Generator`` handed to it. With ``seed`` set, the
dataset gives sample ``index`` the generator ``default_rng([seed, epoch, index])``: the same augmentation
whatever the worker, the number of workers or the order of loading (call :meth:`CocoDataset.set_epoch`
each epoch; DataLoader workers get a fresh copy of the dataset at each epoch unless
``persistent_workers=True``). Without a seed each sample gets fresh OS entropy (never the duplicated
numpy global state of forked workers).
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import (Any, BinaryIO, Callable, Dict, List, Mapping, NamedTuple, Optional, Protocol, Sequence, Tuple,
                    Union)

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from utils.preprocess import resized_shape

logger = logging.getLogger(__name__)


class ProjectLike(Protocol):
    """What this module reads of a ``utils.project.ProjectConfig`` (``efficientdet/`` does not import ``utils/``)."""

    project_name: str
    train_set: str
    val_set: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    obj_list: Tuple[str, ...]


Sample = Dict[str, Any]
#: Our transforms: ``transform(sample, rng) -> sample`` (``rng`` optional on the classes of this module).
Transform = Callable[[Sample, np.random.Generator], Sample]
#: The published convention: ``transform(sample) -> sample`` (e.g. ``torchvision.transforms.Compose``).
PublishedTransform = Callable[[Sample], Sample]

#: Reasons an annotation or image is left out, as counted in :attr:`CocoDataset.skipped`.
SKIP_REASONS = ("crowd", "degenerate", "outside", "missing_image", "bad_image")
#: Overshoot (pixels) beyond which a box counts as crossing the image border (counted in ``clipped``).
OUTSIDE_TOLERANCE = 1.0
#: Boxes narrower or lower than this (pixels) are dropped, at loading and after jitter + crop.
MIN_BOX_SIZE = 1.0
#: Per reason, how many individual warnings are logged before only the summary counts.
_MAX_WARNINGS_PER_REASON = 10


# --------------------------------------------------------------------------------------------------
# Geometry and transforms
# --------------------------------------------------------------------------------------------------

def annotation_path(dataset_root: Union[str, Path], set_name: str) -> Path:
    """The COCO annotation file of one split: ``{dataset_root}/annotations/instances_{set_name}.json``
    (the published layout; the one place that spells it)."""
    return Path(dataset_root) / "annotations" / f"instances_{set_name}.json"


def letterbox_size(height: int, width: int, size: int) -> Tuple[int, int, float]:
    """Size of an image resized so that its longer side is ``size``, keeping its aspect.

    Returns ``(new_height, new_width, scale)`` with ``scale = size / max(height, width)``; the sides are
    those of inference pre-processing (:func:`utils.preprocess.resized_shape`), so training and
    inference see identical geometry. Boxes scale by ``scale``.
    """
    if height <= 0 or width <= 0 or size <= 0:
        raise ValueError(f"letterbox_size: sides must be positive, got height={height}, width={width}, size={size}")
    new_h, new_w = resized_shape(height, width, size, size)
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
    """``(img - mean) / std`` per RGB channel; the image becomes float32 (published ``Normalizer(mean=, std=)``)."""

    def __init__(self, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None) -> Sample:
        sample["img"] = ((sample["img"].astype(np.float32) - self.mean) / self.std).astype(np.float32)
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

    Identical geometry to inference pre-processing (SPEC §3). Boxes are multiplied by ``scale`` (stored in
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
        new_h, new_w, scale = letterbox_size(image.shape[0], image.shape[1], self.size)
        canvas = np.zeros((self.size, self.size, 3), dtype=np.float32)
        canvas[:new_h, :new_w] = _resize(image, new_h, new_w)
        annot = sample["annot"].astype(np.float32, copy=True)
        annot[:, :4] *= scale
        sample.update(img=canvas, annot=annot, scale=float(sample.get("scale", 1.0)) * scale)
        return sample


class RandomScaleCrop:
    """Random scale jitter with crop to ``size × size`` (the official recipe, SPEC §6).

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
        canvas = np.zeros((self.size, self.size, 3), dtype=np.float32)
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


def build_transform(input_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                    flip: bool = True, scale_jitter: bool = False,
                    jitter_range: Tuple[float, float] = (0.1, 2.0), flip_p: float = 0.5) -> Compose:
    """The pipeline: ``Normalizer``, [``HorizontalFlip``], ``RandomScaleCrop`` or ``Resizer``.

    ``train=False`` ignores ``flip`` and ``scale_jitter`` (validation: normalise + resize only).
    """
    transforms: List[Transform] = [Normalizer(mean, std)]
    if train and flip:
        transforms.append(HorizontalFlip(flip_p))
    if train and scale_jitter:
        transforms.append(RandomScaleCrop(input_size, jitter_range))
    else:
        transforms.append(Resizer(input_size))
    return Compose(transforms)


# --------------------------------------------------------------------------------------------------
# Image files: a cheap check without decoding, and decoding that refuses broken files
# --------------------------------------------------------------------------------------------------

#: Bytes read at the end of a file to find its end marker (JPEG ``FF D9``, PNG ``IEND``, GIF ``3B``).
TAIL_BYTES = 4096
#: :func:`verify_image_files` shows a tqdm bar above this many images (with ``progress``).
PROGRESS_MIN_IMAGES = 200
#: Kinds of :class:`ImageProblem` / :class:`BadImageError`.
PROBLEM_KINDS = ("missing", "empty", "unreadable", "unknown_format", "corrupt_header", "truncated", "decode_failed")
#: JPEG start-of-frame markers (they hold the image size); C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_MAX_JPEG_SEGMENTS = 4096
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # the IEND chunk type and its CRC


class ImageInfo(NamedTuple):
    """What an image file's header says.

    ``format``: ``'jpeg'``, ``'png'``, ``'bmp'``, ``'webp'``, ``'gif'``, ``'tiff'``, ``'jpeg2000'``, ``'avif'``,
    ``'pnm'``, ``'pfm'``, ``'hdr'`` or ``'sunraster'``; ``width`` / ``height`` in pixels as stored (before any
    EXIF rotation), None where not parsed (TIFF, JPEG 2000, AVIF, PNM, PFM, HDR); ``size``: file size in bytes.
    """

    format: str
    width: Optional[int]
    height: Optional[int]
    size: int


class ImageProblem(NamedTuple):
    """One bad image of a set: its COCO id, file, ``kind`` (one of :data:`PROBLEM_KINDS`) and a one-line reason."""

    image_id: int
    path: Path
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} (image id {self.image_id}): {self.reason}"


class BadImageError(ValueError):
    """An image file that cannot be used (a ``ValueError`` whose message names the file and the image id).

    Attributes: ``path``, ``kind`` (one of :data:`PROBLEM_KINDS`), ``reason``, ``image_id`` (None if unknown).
    Constructible from the message alone (DataLoader workers re-raise exceptions that way).
    """

    def __init__(self, message: str, path: Union[str, Path, None] = None, kind: str = "decode_failed",
                 reason: str = "", image_id: Optional[int] = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.kind = kind
        self.reason = reason or message
        self.image_id = image_id


class _FormatError(Exception):
    """Raised by the parsers below: ``kind`` and a reason; the callers add the file name."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class _ByteSource(Protocol):
    size: int

    def read(self, offset: int, count: int) -> bytes: ...


class _MemorySource:
    """The bytes of a whole file, in memory (decode time)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read(self, offset: int, count: int) -> bytes:
        return self.data[offset:offset + count]


class _FileSource:
    """An open file, read only where asked (construction time: the header and the tail)."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.size = size

    def read(self, offset: int, count: int) -> bytes:
        self.handle.seek(offset)
        return self.handle.read(count)


def _be16(data: bytes) -> int:
    return int.from_bytes(data[:2], "big")


def _le16(data: bytes) -> int:
    return int.from_bytes(data[:2], "little")


def _le32(data: bytes) -> int:
    return int.from_bytes(data[:4], "little")


def _tail(source: _ByteSource, start: int = 0) -> bytes:
    """The last :data:`TAIL_BYTES` bytes of ``source``, not before ``start``."""
    begin = max(start, source.size - TAIL_BYTES)
    return source.read(begin, source.size - begin)


def _sniff(head: bytes) -> Optional[str]:
    """The image format of a file starting with ``head`` (magic bytes), None if unknown."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\xff\x4f\xff\x51") or head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"):
        return "jpeg2000"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "avif"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n#":
        return "pnm"
    if head[:3] in (b"PF\n", b"Pf\n", b"PF\r", b"Pf\r"):
        return "pfm"
    if head.startswith(b"#?RADIANCE") or head.startswith(b"#?RGBE"):
        return "hdr"
    if head.startswith(b"\x59\xa6\x6a\x95"):
        return "sunraster"
    return None


def _jpeg(source: _ByteSource, head: bytes) -> Tuple[int, int]:
    """Walk the JPEG segments up to the first scan (SOS) for the frame size, then look for the end marker.

    ``FF D9`` cannot occur in entropy-coded data (an ``FF`` there is followed by ``00`` or a restart marker),
    so an ``FF D9`` among the last :data:`TAIL_BYTES` bytes after the scan start is the end of the image;
    padding or other trailing bytes after it are allowed.
    """
    pos, width, height, scan = 2, None, None, None
    for _ in range(_MAX_JPEG_SEGMENTS):
        marker = source.read(pos, 4)
        if len(marker) < 2:
            raise _FormatError("truncated", f"file ends in the JPEG header (byte {pos}): truncated")
        if marker[0] != 0xFF:
            raise _FormatError("corrupt_header", f"corrupt JPEG header: no marker at byte {pos}")
        code = marker[1]
        if code == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if code == 0xD9:
            raise _FormatError("corrupt_header", "JPEG end marker before any image data")
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # markers without a length
            pos += 2
            continue
        if code < 0xC0:
            raise _FormatError("corrupt_header", f"corrupt JPEG header: no marker FF {code:02X} exists (byte {pos})")
        if len(marker) < 4:
            raise _FormatError("truncated", f"file ends in the JPEG header (byte {pos}): truncated")
        length = _be16(marker[2:])
        if length < 2:
            raise _FormatError("corrupt_header", f"corrupt JPEG header: segment length {length} at byte {pos}")
        if code in _JPEG_SOF:
            frame = source.read(pos + 4, 5)
            if len(frame) < 5:
                raise _FormatError("truncated", "file ends in the JPEG frame header: truncated")
            height, width = _be16(frame[1:3]), _be16(frame[3:5])
        if code == 0xDA:
            scan = pos + 2 + length
            break
        pos += 2 + length
    else:
        raise _FormatError("corrupt_header", f"corrupt JPEG header: no image data after {_MAX_JPEG_SEGMENTS} segments")
    if width is None or height is None:
        raise _FormatError("corrupt_header", "corrupt JPEG header: image data before the frame header (SOF)")
    if width == 0 or height == 0:
        raise _FormatError("corrupt_header", f"JPEG frame header gives size {width}x{height}")
    if scan >= source.size or _tail(source, scan).rfind(b"\xff\xd9") < 0:
        raise _FormatError("truncated", "no JPEG end marker (FF D9) at the end of the file: truncated")
    return width, height


def _png(source: _ByteSource, head: bytes) -> Tuple[int, int]:
    """IHDR must be the first chunk (the size); the IEND chunk must end the file (trailing bytes allowed)."""
    if len(head) < 24:
        raise _FormatError("truncated", "file ends in the PNG header: truncated")
    if head[12:16] != b"IHDR":
        raise _FormatError("corrupt_header", "corrupt PNG header: the first chunk is not IHDR")
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if width == 0 or height == 0:
        raise _FormatError("corrupt_header", f"PNG header gives size {width}x{height}")
    if _PNG_IEND not in _tail(source, 24):
        raise _FormatError("truncated", "no PNG IEND chunk at the end of the file: truncated")
    return width, height


def _bmp(source: _ByteSource, head: bytes) -> Tuple[int, int]:
    """Size from the DIB header; the file must be as long as the BMP header declares (when it does)."""
    declared, dib = _le32(head[2:6]), _le32(head[14:18])
    if dib == 12:  # BITMAPCOREHEADER: 16-bit sides
        width, height = _le16(head[18:20]), _le16(head[20:22])
    else:
        width = int.from_bytes(head[18:22], "little", signed=True)
        height = abs(int.from_bytes(head[22:26], "little", signed=True))  # negative: rows top-down
    if width <= 0 or height == 0:
        raise _FormatError("corrupt_header", f"BMP header gives size {width}x{height}")
    if declared and source.size < declared:
        raise _FormatError("truncated", f"BMP header declares {declared} bytes, the file has {source.size}: truncated")
    return width, height


def _webp(source: _ByteSource, head: bytes) -> Tuple[Optional[int], Optional[int]]:
    """The RIFF length must fit in the file; size from the VP8 / VP8L / VP8X chunk."""
    declared = _le32(head[4:8]) + 8
    if source.size < declared:
        raise _FormatError("truncated", f"WebP header declares {declared} bytes, the file has {source.size}: truncated")
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30:
        return _le16(head[26:28]) & 0x3FFF, _le16(head[28:30]) & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25:
        bits = _le32(head[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None, None


def _gif(source: _ByteSource, head: bytes) -> Tuple[int, int]:
    """Size from the logical screen descriptor; the file must end with the trailer ``3B`` (padding allowed)."""
    if len(head) < 10:
        raise _FormatError("truncated", "file ends in the GIF header: truncated")
    if not _tail(source, 10).rstrip(b"\x00").endswith(b";"):
        raise _FormatError("truncated", "no GIF trailer (3B) at the end of the file: truncated")
    return _le16(head[6:8]), _le16(head[8:10])


def _sunraster(source: _ByteSource, head: bytes) -> Tuple[int, int]:
    if len(head) < 12:
        raise _FormatError("truncated", "file ends in the Sun raster header: truncated")
    return int.from_bytes(head[4:8], "big"), int.from_bytes(head[8:12], "big")


_PARSERS: Dict[str, Callable[[_ByteSource, bytes], Tuple[Optional[int], Optional[int]]]] = {
    "jpeg": _jpeg, "png": _png, "bmp": _bmp, "webp": _webp, "gif": _gif, "sunraster": _sunraster}


def _inspect(source: _ByteSource) -> ImageInfo:
    """Format, size and completeness of an image from its header and tail; raises :class:`_FormatError`."""
    if source.size == 0:
        raise _FormatError("empty", "empty file (0 bytes)")
    head = source.read(0, 32)
    fmt = _sniff(head)
    if fmt is None:
        raise _FormatError("unknown_format", f"not an image of a known format (first bytes: {head[:8].hex(' ')})")
    parser = _PARSERS.get(fmt)
    width, height = parser(source, head) if parser is not None else (None, None)
    return ImageInfo(fmt, width, height, source.size)


def _where(path: Path, image_id: Optional[int]) -> str:
    return f"{path}" + (f" (image id {image_id})" if image_id is not None else "")


def inspect_image_file(path: Union[str, Path], image_id: Optional[int] = None) -> ImageInfo:
    """Check one image file without decoding it: the header and the last :data:`TAIL_BYTES` bytes only.

    Known formats by magic bytes (JPEG, PNG, BMP, WebP, GIF, TIFF, JPEG 2000, AVIF, PNM, PFM, Radiance HDR, Sun
    raster); truncation is detected for JPEG (no end marker ``FF D9`` after the image data), PNG (no IEND
    chunk), GIF (no trailer), BMP and WebP (shorter than their header declares). A JPEG followed by more than
    :data:`TAIL_BYTES` bytes of other data (e.g. a motion photo's video) reads as truncated.

    Raises:
        FileNotFoundError: no such file ("image file not found: PATH (image id N)").
        BadImageError: (a ValueError) empty, unreadable, unknown format, corrupt header or truncated, naming
            the file, the image id and the reason.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _inspect(_FileSource(handle, os.fstat(handle.fileno()).st_size))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {_where(path, image_id)}") from None
    except _FormatError as exc:
        raise BadImageError(f"cannot read image {_where(path, image_id)}: {exc.reason}", path, exc.kind,
                            exc.reason, image_id) from None
    except OSError as exc:  # a directory, no permission, an I/O error
        reason = f"cannot read the file ({exc.strerror or exc})"
        raise BadImageError(f"cannot read image {_where(path, image_id)}: {reason}", path, "unreadable", reason,
                            image_id) from None


def read_image(path: Union[str, Path], image_id: Optional[int] = None) -> np.ndarray:
    """Read and decode an image file: ``np.ndarray[H, W, 3] uint8``, BGR (as ``cv2.imread(path)``).

    The bytes get the checks of :func:`inspect_image_file` first (in memory), so a truncated JPEG is an
    error instead of an image completed in grey by libjpeg; then ``cv2.imdecode(..., cv2.IMREAD_COLOR)``
    (EXIF orientation applied, as ``cv2.imread``).

    Raises:
        FileNotFoundError: no such file, naming it and the image id.
        BadImageError: (a ValueError) unreadable, empty, unknown format, corrupt header, truncated, or OpenCV
            cannot decode it; naming the file, the image id and the reason.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {_where(path, image_id)}") from None
    except OSError as exc:
        reason = f"cannot read the file ({exc.strerror or exc})"
        raise BadImageError(f"cannot read image {_where(path, image_id)}: {reason}", path, "unreadable", reason,
                            image_id) from None
    try:
        _inspect(_MemorySource(data))
    except _FormatError as exc:
        raise BadImageError(f"cannot read image {_where(path, image_id)}: {exc.reason}", path, exc.kind,
                            exc.reason, image_id) from None
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        reason = "OpenCV cannot decode it (corrupt image data)"
        raise BadImageError(f"cannot read image {_where(path, image_id)}: {reason}", path, "decode_failed", reason,
                            image_id)
    return image


def _check_file(image_id: int, path: Path) -> Tuple[Optional[ImageInfo], Optional[ImageProblem]]:
    """(info, None) for a good file, (None, problem) for a bad one."""
    try:
        return inspect_image_file(path, image_id), None
    except FileNotFoundError:
        return None, ImageProblem(image_id, path, "missing", "image file not found")
    except BadImageError as exc:
        return None, ImageProblem(image_id, path, exc.kind, exc.reason)


def verify_image_files(images: Sequence[Tuple[int, Union[str, Path]]], progress: bool = True,
                       expected_sizes: Optional[Mapping[int, Tuple[int, int]]] = None,
                       desc: str = "checking images") -> List[ImageProblem]:
    """Check ``(image_id, path)`` pairs with :func:`inspect_image_file` (header and tail, no decoding).

    Returns the problems in the order given (empty: all good). With ``progress``, a tqdm bar above
    :data:`PROGRESS_MIN_IMAGES` images. ``expected_sizes`` maps image ids to the ``(width, height)`` of the
    annotation file: images whose header says otherwise are logged (one warning for all), not problems.
    """
    problems: List[ImageProblem] = []
    mismatched: List[str] = []
    bar = tqdm(images, desc=desc, unit="img", leave=False,
               disable=not progress or len(images) <= PROGRESS_MIN_IMAGES)
    for image_id, path in bar:
        info, problem = _check_file(image_id, Path(path))
        if problem is not None:
            problems.append(problem)
        expected = expected_sizes.get(image_id) if expected_sizes is not None and info is not None else None
        if expected is not None and info.width is not None and (info.width, info.height) != tuple(expected):
            mismatched.append(f"{path} (image id {image_id}) is {info.width}x{info.height}, "
                              f"listed as {expected[0]}x{expected[1]}")
    if mismatched:
        logger.warning("%d of %d images differ in size from their annotation entry (boxes are used as given; "
                       "EXIF-rotated JPEGs decode rotated); first: %s", len(mismatched), len(images), mismatched[0])
    return problems


def verify_images(dataset: "CocoDataset", progress: bool = True) -> List[ImageProblem]:
    """Check every image of ``dataset`` without decoding (see :func:`verify_image_files`); [] if all good.

    :class:`CocoDataset` runs this check when constructed (``verify_images=True``, the default); this function
    re-checks the images it kept.
    """
    records = dataset._records
    return verify_image_files([(r.image_id, r.path) for r in records], progress,
                              {r.image_id: (r.width, r.height) for r in records},
                              desc=f"checking {dataset.set_name} images")


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------

def read_json(path: Union[str, Path], kind: str = "JSON file") -> Any:
    """The parsed content of a JSON file; ``kind`` names the file in the not-found message.

    Raises:
        FileNotFoundError: the file does not exist ("{kind} not found: {path}").
        ValueError: not UTF-8 or malformed JSON, naming the file and the position.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_coco_json(path: Union[str, Path], keys: Sequence[str] = ("images", "annotations")) -> Dict[str, Any]:
    """Read a COCO instances JSON whose ``keys`` must be lists.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not UTF-8, malformed JSON, not an object, or a key missing / not a list (named).
    """
    path = Path(path)
    data = read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with {', '.join(repr(k) for k in keys)}, "
                         f"got {type(data).__name__}")
    for key in keys:
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: key {key!r}: expected a list, got {type(data[key]).__name__}")
    return data


def _check_entry(path: Path, section: str, position: int, entry: Any, keys: Sequence[str]) -> None:
    """``entry`` (``data[section][position]`` of a COCO JSON) is an object holding ``keys``; else a ValueError
    naming the file, the entry (its id where it has one) and the key."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {section}[{position}]: expected an object, got {type(entry).__name__}")
    label = {"images": "image", "annotations": "annotation"}.get(section, section)
    for key in keys:
        if key not in entry:
            raise ValueError(f"{path}: {label} id {entry.get('id', '?')} ({section}[{position}]): missing key {key!r}")


class _ImageRecord(NamedTuple):
    image_id: int
    path: Path
    width: int
    height: int


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class CocoDataset(Dataset):
    """A COCO-format detection set, validated when constructed.

    Args:
        root: the project's dataset folder (``--data_path/PROJECT``); ``root_dir`` is the published name.
        set_name: ``train2017``, ``val``, …: images in ``root/set_name``, annotations in
            ``root/annotations/instances_<set_name>.json``; ``set`` is the published name (default
            ``'train2017'``).
        obj_list: the project (``utils.project.ProjectConfig``) or its ``obj_list``; ``obj_list[category_id - 1]``
            must be a non-empty name for every category id used. None: the names of the json's
            ``categories``, at ``category_id - 1`` (``''`` for unused ids), as the published dataset labels them.
        transform: ``transform(sample, rng) -> sample`` (see :func:`build_transform`) or a published
            one-argument ``transform(sample)`` (:func:`takes_rng` tells which); None returns the RGB image in
            [0, 1] at its original size.
        skip_missing: leave out images whose file is missing (logged and counted in
            ``skipped['missing_image']``) instead of raising.
        seed: makes augmentation deterministic per (seed, epoch, index); None draws fresh entropy.
        skip_bad_images: leave out every bad image found at construction (missing, empty, unknown format,
            corrupt header, truncated: logged, counted in ``skipped['missing_image']`` / ``skipped['bad_image']``
            and listed in :attr:`bad_images`) instead of raising; an image that still fails to decode when
            loaded is replaced (see :meth:`__getitem__`) and counted in :attr:`decode_failures`.
        verify_images: check every image file at construction without decoding (:func:`verify_image_files`:
            header and tail, a small fraction of an epoch's loading); False checks only that the files
            exist (bad content then shows when loaded).
        progress: a tqdm bar for the check on sets over :data:`PROGRESS_MIN_IMAGES` images.

    The published call ``CocoDataset(root_dir, set='train2017', transform=None)`` works, by keyword or
    positionally: a callable third positional argument is the transform (the published order).

    Annotations kept: not crowd, width and height ≥ 1 px, at least 1 px × 1 px inside the image. Boxes
    crossing the image border are clipped to it (the visible part of an object cut by the border, as the
    official pipeline's box clipping; ``../shared/data/shape`` has many) and counted in :attr:`clipped`
    (more than 1 px overshoot). Crowd boxes are counted in ``skipped['crowd']``; degenerate boxes and boxes
    outside the image are skipped with a warning and counted in :attr:`skipped` (one summary line per
    dataset). Images without a kept annotation stay in the set (negatives; ``annot`` is ``np.ndarray[0, 5]``).

    Raises:
        FileNotFoundError: the annotation file does not exist.
        ValueError: malformed JSON, a missing key or bad value (naming the file, the key and the image
            or annotation id), a category id without a class in ``obj_list``; a bad image file (naming the
            first one, its image id and the reason, and the number of bad files) unless skipped.
    """

    def __init__(self, root: Union[str, Path, None] = None, set_name: Optional[str] = None,
                 obj_list: Union[ProjectLike, Sequence[str], Transform, PublishedTransform, None] = None,
                 transform: Union[Transform, PublishedTransform, None] = None, skip_missing: bool = False,
                 seed: Optional[int] = None, *, root_dir: Union[str, Path, None] = None, set: Optional[str] = None,
                 skip_bad_images: bool = False, verify_images: bool = True, progress: bool = True) -> None:
        super().__init__()
        if (root is None) == (root_dir is None):
            raise ValueError("CocoDataset: give the dataset folder once, as root (or the published root_dir), "
                             f"got root={root!r}, root_dir={root_dir!r}")
        if set_name is not None and set is not None:
            raise ValueError(f"CocoDataset: give set_name or the published set, not both ({set_name!r}, {set!r})")
        if callable(obj_list) and not isinstance(obj_list, (list, tuple)):
            if transform is not None:
                raise ValueError(f"CocoDataset: obj_list must be a project or a list of class names, got {obj_list!r}")
            obj_list, transform = None, obj_list  # published positional order: (root_dir, set, transform)
        names: Optional[Sequence[str]] = None
        if obj_list is not None:
            names = obj_list if isinstance(obj_list, (list, tuple)) else getattr(obj_list, "obj_list", None)
            if names is None or any(not isinstance(name, str) for name in names):
                raise ValueError(f"CocoDataset: obj_list must be a project or a list of class names, got {obj_list!r}")
        self.root = Path(root if root is not None else root_dir)
        self.set_name = str(set_name if set_name is not None else (set if set is not None else "train2017"))
        self.obj_list: Tuple[str, ...] = tuple(names) if names is not None else ()
        self._obj_list_given = names is not None
        self.transform = transform
        self.skip_missing = skip_missing
        self.skip_bad_images = skip_bad_images
        self.verify_images = verify_images
        self.progress = progress
        self.seed = seed
        self.epoch = 0
        self.annotation_file = annotation_path(self.root, self.set_name)
        self.image_dir = self.root / self.set_name
        self.skipped: Dict[str, int] = {reason: 0 for reason in SKIP_REASONS}
        self.clipped = 0
        #: The images left out at construction (missing or bad files), with their reasons.
        self.bad_images: List[ImageProblem] = []
        self._records: List[_ImageRecord] = []
        self._annotations: List[np.ndarray] = []
        self._size_warned: Dict[int, bool] = {}
        self._load()
        # images found undecodable when loaded; in shared memory, so DataLoader workers' findings are seen here
        self._undecodable = torch.zeros(len(self._records), dtype=torch.bool).share_memory_()

    # ---- construction ------------------------------------------------------------------------

    def _read_json(self) -> Dict[str, Any]:
        return read_coco_json(self.annotation_file)

    def _warn(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= _MAX_WARNINGS_PER_REASON:
            logger.warning("%s: %s", self.annotation_file, message)
        elif self.skipped[reason] == _MAX_WARNINGS_PER_REASON + 1:
            logger.warning("%s: more %r skips follow; see the summary", self.annotation_file, reason)

    def _load(self) -> None:
        path = self.annotation_file
        data = self._read_json()
        if self._obj_list_given:
            self._check_category_names(data.get("categories"))
        else:
            self.obj_list = obj_list_from_categories(data.get("categories"), path)

        images: Dict[int, _ImageRecord] = {}
        order: List[int] = []
        for position, entry in enumerate(data["images"]):
            _check_entry(path, "images", position, entry, ("id", "file_name", "width", "height"))
            image_id = entry["id"]
            if isinstance(image_id, bool) or not isinstance(image_id, int):
                raise ValueError(f"{path}: images[{position}]: key 'id': expected an integer, got {image_id!r}")
            if image_id in images:
                raise ValueError(f"{path}: image id {image_id}: duplicate id")
            for key in ("width", "height"):
                if not _is_number(entry[key]) or entry[key] <= 0:
                    raise ValueError(f"{path}: image id {image_id}: key {key!r}: expected a positive number, "
                                     f"got {entry[key]!r}")
            if not isinstance(entry["file_name"], str) or not entry["file_name"]:
                raise ValueError(f"{path}: image id {image_id}: key 'file_name': expected a file name, "
                                 f"got {entry['file_name']!r}")
            images[image_id] = _ImageRecord(image_id, self.image_dir / entry["file_name"],
                                            int(entry["width"]), int(entry["height"]))
            order.append(image_id)

        boxes: Dict[int, List[List[float]]] = {image_id: [] for image_id in order}
        for position, ann in enumerate(data["annotations"]):
            self._parse_annotation(position, ann, images, boxes)

        left_out = self._check_image_files([images[i] for i in order])
        kept = [image_id for image_id in order if image_id not in left_out]
        self._records = [images[image_id] for image_id in kept]
        self._annotations = [np.asarray(boxes[image_id], dtype=np.float32).reshape(-1, 5) for image_id in kept]
        self._log_summary(len(order))

    def _check_image_files(self, records: Sequence[_ImageRecord]) -> Dict[int, ImageProblem]:
        """Check the listed image files; the problems left out (by image id), or a ValueError for the first
        one not skipped. Cheap: header and tail of each file (:func:`verify_image_files`), or with
        ``verify_images=False`` only whether each exists."""
        if self.verify_images:
            problems = verify_image_files([(r.image_id, r.path) for r in records], self.progress,
                                          {r.image_id: (r.width, r.height) for r in records},
                                          desc=f"checking {self.set_name} images")
        else:
            problems = [ImageProblem(r.image_id, r.path, "missing", "image file not found")
                        for r in records if not r.path.is_file()]
        fatal = [p for p in problems if not (self.skip_bad_images or (self.skip_missing and p.kind == "missing"))]
        if fatal:
            hint = ("skip_bad_images=True (or skip_missing=True) to leave missing files out"
                    if all(p.kind == "missing" for p in fatal) else "skip_bad_images=True to leave them out")
            raise ValueError(f"{fatal[0]}; {len(fatal)} of {len(records)} image files listed in "
                             f"{self.annotation_file} are bad (pass {hint})")
        for problem in problems:
            self._warn("missing_image" if problem.kind == "missing" else "bad_image", f"{problem} (left out)")
        self.bad_images = list(problems)
        return {problem.image_id: problem for problem in problems}

    def _parse_annotation(self, position: int, ann: Any, images: Dict[int, _ImageRecord],
                          boxes: Dict[int, List[List[float]]]) -> None:
        path = self.annotation_file
        _check_entry(path, "annotations", position, ann, ("id", "image_id", "category_id", "bbox"))
        ann_id = ann["id"]
        if ann["image_id"] not in images:
            raise ValueError(f"{path}: annotation id {ann_id}: image_id {ann['image_id']!r} is not in 'images'")
        record = images[ann["image_id"]]
        category_id = ann["category_id"]
        if isinstance(category_id, bool) or not isinstance(category_id, int):
            raise ValueError(f"{path}: annotation id {ann_id}: key 'category_id': expected an integer, "
                             f"got {category_id!r}")
        if not 1 <= category_id <= len(self.obj_list) or self.obj_list[category_id - 1] == "":
            raise ValueError(f"{path}: annotation id {ann_id}: category_id {category_id} has no class in the "
                             f"project's obj_list ({len(self.obj_list)} entries, obj_list[category_id - 1] "
                             "must be a non-empty name)")
        bbox = ann["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ValueError(f"{path}: annotation id {ann_id}: key 'bbox': expected [x, y, width, height] "
                             f"numbers, got {bbox!r}")
        if ann.get("iscrowd", 0):
            self.skipped["crowd"] += 1
            return
        x, y, w, h = (float(v) for v in bbox)
        where = f"annotation id {ann_id} (image id {record.image_id}, {record.path.name})"
        if w < MIN_BOX_SIZE or h < MIN_BOX_SIZE:
            self._warn("degenerate", f"{where}: degenerate box {list(bbox)} (width or height < "
                                     f"{MIN_BOX_SIZE:g} px), skipped")
            return
        x1, y1, x2, y2 = x, y, x + w, y + h
        overshoot = max(-x1, -y1, x2 - record.width, y2 - record.height)
        cx1, cx2 = min(max(x1, 0.0), record.width), min(max(x2, 0.0), record.width)
        cy1, cy2 = min(max(y1, 0.0), record.height), min(max(y2, 0.0), record.height)
        if cx2 - cx1 < MIN_BOX_SIZE or cy2 - cy1 < MIN_BOX_SIZE:
            if overshoot > OUTSIDE_TOLERANCE:
                self._warn("outside", f"{where}: box {list(bbox)} lies outside the {record.width}x{record.height} "
                                      f"image (under {MIN_BOX_SIZE:g} px of it inside), skipped")
            else:
                self._warn("degenerate", f"{where}: box {list(bbox)} is under {MIN_BOX_SIZE:g} px once clipped "
                                         "to the image, skipped")
            return
        if overshoot > OUTSIDE_TOLERANCE:
            self.clipped += 1
        boxes[record.image_id].append([cx1, cy1, cx2, cy2, float(category_id - 1)])

    def _check_category_names(self, categories: Any) -> None:
        """Warn (once) where the json's category names differ from ``obj_list`` at ``id - 1``."""
        if not isinstance(categories, list):
            return
        differing = []
        # the 'categories' list is informative only (labels come from category_id): malformed entries are ignored
        usable = [c for c in categories if isinstance(c, dict) and isinstance(c.get("id"), int)]
        for category in usable:
            index = category["id"] - 1
            name = self.obj_list[index] if 0 <= index < len(self.obj_list) else None
            if name and name != category.get("name"):
                differing.append(f"id {category['id']}: {category.get('name')!r} vs {name!r}")
        if differing:
            logger.warning("%s: %d category names differ from obj_list[id - 1] (labels follow category_id): %s",
                           self.annotation_file, len(differing), "; ".join(differing[:5]))

    def _log_summary(self, num_listed: int) -> None:
        num_boxes = sum(len(a) for a in self._annotations)
        counts = ", ".join(f"{reason} {count}" for reason, count in self.skipped.items() if count)
        message = (f"{self.annotation_file}: {len(self._records)} of {num_listed} images, {num_boxes} boxes"
                   + (f" ({self.clipped} clipped to the image border)" if self.clipped else "")
                   + (f"; skipped: {counts}" if counts else ""))
        bad = sum(count for reason, count in self.skipped.items() if reason != "crowd")
        logger.log(logging.WARNING if bad else logging.INFO, message)

    # ---- access ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    @property
    def num_classes(self) -> int:
        return len(self.obj_list)

    @property
    def image_ids(self) -> List[int]:
        """COCO image ids, in the order of the json's ``images``."""
        return [record.image_id for record in self._records]

    def image_path(self, index: int) -> Path:
        return self._records[index].path

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (with ``seed`` set)."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator for sample ``index``: ``default_rng([seed, epoch, index])``, or fresh entropy."""
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([int(self.seed), self.epoch, int(index)])

    def load_annotations(self, index: int) -> np.ndarray:
        """``np.ndarray[M, 5] float32 (x1, y1, x2, y2, label)``, original image pixels (a copy)."""
        return self._annotations[index].copy()

    def load_image(self, index: int) -> np.ndarray:
        """``np.ndarray[H, W, 3] float32``, RGB in [0, 1].

        The file's bytes are checked (as at construction) and decoded with ``cv2.imdecode``
        (:func:`read_image`): a truncated JPEG is an error, never an image completed in grey.

        Raises:
            FileNotFoundError: the file is gone, naming it and the image id.
            BadImageError: (a ValueError) the file cannot be read or decoded (empty, unknown format,
                truncated, corrupt), naming it, the image id and the reason.
        """
        record = self._records[index]
        image = read_image(record.path, record.image_id)
        if image.shape[:2] != (record.height, record.width) and record.image_id not in self._size_warned:
            self._size_warned[record.image_id] = True
            logger.warning("%s (image id %d) is %dx%d but %s says %dx%d; boxes are used as given", record.path,
                           record.image_id, image.shape[1], image.shape[0], self.annotation_file.name,
                           record.width, record.height)
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return image.astype(np.float32) / 255.0

    @property
    def decode_failures(self) -> int:
        """How many images failed to decode when loaded with ``skip_bad_images`` (across DataLoader workers)."""
        return int(self._undecodable.sum())

    def _load_or_replace(self, index: int) -> Tuple[int, np.ndarray]:
        """``(index, image)``; with ``skip_bad_images`` an image that fails to load is replaced by the next one
        (``index + 1``, ``index + 2``, … wrapping around) that loads: ``(that index, its image)``."""
        if not self.skip_bad_images:
            return index, self.load_image(index)
        count = len(self._records)
        for step in range(count):
            candidate = (index + step) % count
            if bool(self._undecodable[candidate]):  # found bad before (here or in another worker)
                continue
            try:
                return candidate, self.load_image(candidate)
            except (BadImageError, FileNotFoundError) as exc:
                self._undecodable[candidate] = True
                logger.warning("%s (skip_bad_images: left out; its samples are replaced by the next image that "
                               "loads; %d such images so far)", exc, self.decode_failures)
        raise ValueError(f"{self.annotation_file}: none of the {count} images loads (skip_bad_images)")

    def __getitem__(self, index: int) -> Sample:
        """Sample ``index`` (see the module docstring), transformed with the generator :meth:`rng` (``index``).

        With ``skip_bad_images``, an image that fails to decode here is counted in :attr:`decode_failures`,
        logged, and replaced deterministically by the next sample (``index + 1``, … wrapping around) whose
        image loads, with sample ``index``'s augmentation stream; 'image_id' is then the replacement's.
        """
        used, image = self._load_or_replace(index)
        sample: Sample = {"img": image, "annot": self.load_annotations(used), "scale": 1.0,
                          "image_id": self._records[used].image_id}
        if self.transform is not None:
            sample = apply_transform(self.transform, sample, self.rng(index))
        return sample

    # ---- published names ----------------------------------------------------------------------

    @property
    def root_dir(self) -> Path:
        """The published name of :attr:`root`."""
        return self.root

    @property
    def labels(self) -> Dict[int, str]:
        """``{label: class name}`` for the named classes, ``label = category_id - 1`` (the labels of 'annot')."""
        return {label: name for label, name in enumerate(self.obj_list) if name}

    @property
    def classes(self) -> Dict[str, int]:
        """``{class name: label}``, the inverse of :attr:`labels`."""
        return {name: label for label, name in self.labels.items()}


def obj_list_from_categories(categories: Any, path: Union[str, Path]) -> Tuple[str, ...]:
    """Class names from a COCO json's ``categories``: ``obj_list[category_id - 1] = name``, ``''`` for unused ids.

    Raises:
        ValueError: ``categories`` missing, empty or malformed (an entry without an integer id ≥ 1 and a
            non-empty name, or a duplicate id), naming the file (``path``) and the entry.
    """
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{path}: no obj_list given and no 'categories' list to take the class names from")
    names: Dict[int, str] = {}
    for position, category in enumerate(categories):
        category_id = category.get("id") if isinstance(category, dict) else None
        name = category.get("name") if isinstance(category, dict) else None
        if isinstance(category_id, bool) or not isinstance(category_id, int) or category_id < 1:
            raise ValueError(f"{path}: categories[{position}]: expected an integer 'id' >= 1, got {category!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{path}: category id {category_id}: expected a non-empty 'name', got {name!r}")
        if category_id in names:
            raise ValueError(f"{path}: category id {category_id}: duplicate id")
        names[category_id] = name
    return tuple(names.get(i, "") for i in range(1, max(names) + 1))


# --------------------------------------------------------------------------------------------------
# Batching and loaders
# --------------------------------------------------------------------------------------------------

def _float_tensor(value: Any) -> torch.Tensor:
    """A numpy array or a tensor as a float32 tensor (no copy where it already is one)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def collater(batch: Sequence[Sample]) -> Dict[str, Any]:
    """Stack samples of one size into a batch (the published ``collater(data)``).

    Each sample's 'img' (``[S, S, 3]``, HWC) and 'annot' (``[M, 5]``) may be numpy arrays or tensors (the
    published ``Resizer`` returns tensors).

    Returns:
        ``{'img': Tensor[B, 3, S, S] float32 (NCHW), 'annot': Tensor[B, M_max, 5] float32
        (x1, y1, x2, y2, label), rows beyond an image's boxes filled with -1, M_max >= 1,
        'scale': list[float], 'image_id': list[int]}``.

    Raises:
        ValueError: empty batch or images of different sizes (no resizing transform).
    """
    if not batch:
        raise ValueError("collater: empty batch")
    shapes = {tuple(sample["img"].shape) for sample in batch}
    if len(shapes) != 1:
        raise ValueError(f"collater: images of different sizes {sorted(shapes)}; use a Resizer/RandomScaleCrop")
    images = torch.stack([_float_tensor(s["img"]) for s in batch], dim=0)
    annots = [_float_tensor(s["annot"]).reshape(-1, 5) for s in batch]
    max_boxes = max(1, max(len(a) for a in annots))
    padded = torch.full((len(batch), max_boxes, 5), -1.0, dtype=torch.float32)
    for i, annot in enumerate(annots):
        if len(annot):
            padded[i, :len(annot)] = annot
    return {"img": images.permute(0, 3, 1, 2).contiguous(), "annot": padded,
            "scale": [float(s.get("scale", 1.0)) for s in batch],
            "image_id": [s.get("image_id", -1) for s in batch]}


class DataBundle(NamedTuple):
    """Datasets and loaders made by :func:`create_dataloaders`."""

    train_set: CocoDataset
    val_set: CocoDataset
    train_loader: DataLoader
    val_loader: DataLoader


def create_dataloaders(project: ProjectLike, data_path: Union[str, Path], input_size: int, batch_size: int,
                       num_workers: int = 0, flip: bool = True, scale_jitter: bool = False,
                       jitter_range: Tuple[float, float] = (0.1, 2.0),
                       sampler: Optional[Callable[[CocoDataset, bool], Sampler]] = None, seed: Optional[int] = None,
                       skip_missing: bool = False, pin_memory: bool = False,
                       val_batch_size: Optional[int] = None, skip_bad_images: bool = False,
                       verify_images: bool = True, progress: bool = True) -> DataBundle:
    """Train and val sets of ``data_path/project.project_name`` and their DataLoaders.

    Train: ``project.train_set`` with normalise, [flip], [scale jitter + crop] or resize; shuffled (by
    ``torch.Generator().manual_seed(seed)`` when ``seed`` is set); ``drop_last=True`` as published.
    Val: ``project.val_set`` with normalise + resize, in order, every image (``drop_last=False``).
    ``sampler(dataset, train) -> Sampler`` replaces shuffling for both loaders, e.g.
    ``lambda ds, train: DistributedSampler(ds, shuffle=train, seed=seed or 0)`` (the caller calls its
    ``set_epoch``). Call ``train_set.set_epoch(epoch)`` each epoch for a new augmentation stream with
    ``seed`` set.

    Both sets check their image files when built (``verify_images``, header and tail of each file, before
    the first training step) and raise a ValueError naming the first bad file; ``skip_bad_images`` leaves
    bad images out instead (logged, counted in ``skipped``) and replaces images that fail to decode later
    (:meth:`CocoDataset.__getitem__`); ``skip_missing`` leaves out missing files only. ``progress``: tqdm
    bars for the checks of large sets.

    Raises:
        FileNotFoundError / ValueError: from :class:`CocoDataset`; bad sizes or a train set smaller than
        one batch.
    """
    if int(input_size) <= 0 or int(batch_size) <= 0 or int(num_workers) < 0:
        raise ValueError(f"create_dataloaders: need input_size > 0, batch_size > 0, num_workers >= 0, got "
                         f"{input_size}, {batch_size}, {num_workers}")
    root = Path(data_path) / project.project_name
    train_tf = build_transform(input_size, project.mean, project.std, train=True, flip=flip,
                               scale_jitter=scale_jitter, jitter_range=jitter_range)
    val_tf = build_transform(input_size, project.mean, project.std, train=False)
    checks = dict(skip_missing=skip_missing, skip_bad_images=skip_bad_images, verify_images=verify_images,
                  progress=progress)
    train_set = CocoDataset(root, project.train_set, project, transform=train_tf, seed=seed, **checks)
    val_set = CocoDataset(root, project.val_set, project, transform=val_tf, seed=seed, **checks)
    train_sampler = sampler(train_set, True) if sampler is not None else None
    val_sampler = sampler(val_set, False) if sampler is not None else None
    if train_sampler is None and len(train_set) < batch_size:
        raise ValueError(f"{train_set.annotation_file}: {len(train_set)} images, fewer than one batch of "
                         f"{batch_size} (the training loader drops incomplete batches)")
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=train_sampler is None,
                              sampler=train_sampler, drop_last=True, collate_fn=collater,
                              num_workers=num_workers, pin_memory=pin_memory, generator=generator)
    val_loader = DataLoader(val_set, batch_size=val_batch_size or batch_size, shuffle=False, sampler=val_sampler,
                            drop_last=False, collate_fn=collater, num_workers=num_workers, pin_memory=pin_memory)
    return DataBundle(train_set, val_set, train_loader, val_loader)
