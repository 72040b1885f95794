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

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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
Transform = Callable[[Sample, np.random.Generator], Sample]

#: Reasons an annotation or image is left out, as counted in :attr:`CocoDataset.skipped`.
SKIP_REASONS = ("crowd", "degenerate", "outside", "missing_image")
#: Overshoot (pixels) beyond which a box counts as crossing the image border (counted in ``clipped``).
OUTSIDE_TOLERANCE = 1.0
#: Boxes narrower or lower than this (pixels) are dropped, at loading and after jitter + crop.
MIN_BOX_SIZE = 1.0
#: Per reason, how many individual warnings are logged before only the summary counts.
_MAX_WARNINGS_PER_REASON = 10


# --------------------------------------------------------------------------------------------------
# Geometry and transforms
# --------------------------------------------------------------------------------------------------

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


class Normalizer:
    """``(img - mean) / std`` per RGB channel; the image becomes float32."""

    def __init__(self, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sample["img"] = ((sample["img"].astype(np.float32) - self.mean) / self.std).astype(np.float32)
        return sample


class HorizontalFlip:
    """Mirror the image left-right with probability ``p``; boxes ``x1' = W - x2``, ``x2' = W - x1``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"HorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
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


class Resizer:
    """Aspect-preserving resize so the longer side is ``size``, pasted top-left on a zero ``size × size`` canvas.

    Identical geometry to inference pre-processing (SPEC §3). Boxes are multiplied by ``scale`` (stored in
    the sample); none are dropped (as the published ``Resizer``).
    """

    def __init__(self, size: int = 512) -> None:
        if int(size) <= 0:
            raise ValueError(f"Resizer: size must be positive, got {size}")
        self.size = int(size)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
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

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
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
    """Apply transforms in order, each ``t(sample, rng) -> sample``."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, rng)
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
        root: the project's dataset folder (``--data_path/PROJECT``).
        set_name: ``train2017``, ``val``, …: images in ``root/set_name``, annotations in
            ``root/annotations/instances_<set_name>.json``.
        obj_list: the project (``utils.project.ProjectConfig``) or its ``obj_list``; ``obj_list[category_id - 1]``
            must be a non-empty name for every category id used.
        transform: ``transform(sample, rng) -> sample`` (see :func:`build_transform`); None returns the
            RGB image in [0, 1] at its original size.
        skip_missing: leave out images whose file is missing (logged and counted) instead of raising.
        seed: makes augmentation deterministic per (seed, epoch, index); None draws fresh entropy.

    Annotations kept: not crowd, width and height ≥ 1 px, at least 1 px × 1 px inside the image. Boxes
    crossing the image border are clipped to it (the visible part of an object cut by the border, as the
    official pipeline's box clipping; ``../shared/data/shape`` has many) and counted in :attr:`clipped`
    (more than 1 px overshoot). Crowd boxes are counted in ``skipped['crowd']``; degenerate boxes and boxes
    outside the image are skipped with a warning and counted in :attr:`skipped` (one summary line per
    dataset). Images without a kept annotation stay in the set (negatives; ``annot`` is ``np.ndarray[0, 5]``).

    Raises:
        FileNotFoundError: the annotation file does not exist.
        ValueError: malformed JSON, a missing key or bad value (naming the file, the key and the image
            or annotation id), a category id without a class in ``obj_list``, a missing image file.
    """

    def __init__(self, root: Union[str, Path], set_name: str,
                 obj_list: Union[ProjectLike, Sequence[str]], transform: Optional[Transform] = None,
                 skip_missing: bool = False, seed: Optional[int] = None) -> None:
        super().__init__()
        self.root = Path(root)
        self.set_name = str(set_name)
        names = obj_list if isinstance(obj_list, (list, tuple)) else getattr(obj_list, "obj_list", None)
        if names is None or any(not isinstance(name, str) for name in names):
            raise ValueError(f"CocoDataset: obj_list must be a project or a list of class names, got {obj_list!r}")
        self.obj_list: Tuple[str, ...] = tuple(names)
        self.transform = transform
        self.skip_missing = skip_missing
        self.seed = seed
        self.epoch = 0
        self.annotation_file = self.root / "annotations" / f"instances_{self.set_name}.json"
        self.image_dir = self.root / self.set_name
        self.skipped: Dict[str, int] = {reason: 0 for reason in SKIP_REASONS}
        self.clipped = 0
        self._records: List[_ImageRecord] = []
        self._annotations: List[np.ndarray] = []
        self._size_warned: set = set()
        self._load()

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
        self._check_category_names(data.get("categories"))

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

        missing: List[_ImageRecord] = [images[i] for i in order if not images[i].path.is_file()]
        if missing and not self.skip_missing:
            raise ValueError(f"image file not found: {missing[0].path} (image id {missing[0].image_id} in {path}"
                             + (f"; {len(missing)} image files missing in all" if len(missing) > 1 else "")
                             + "; pass skip_missing=True to leave them out)")
        missing_ids = set()
        for record in missing:
            missing_ids.add(record.image_id)
            self._warn("missing_image", f"image id {record.image_id}: file not found: {record.path} (left out)")

        kept = [image_id for image_id in order if image_id not in missing_ids]
        self._records = [images[image_id] for image_id in kept]
        self._annotations = [np.asarray(boxes[image_id], dtype=np.float32).reshape(-1, 5) for image_id in kept]
        self._log_summary(len(order))

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

        Raises:
            ValueError: the file cannot be decoded (corrupt, empty or not an image), naming it.
        """
        record = self._records[index]
        image = cv2.imread(str(record.path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read image {record.path} (image id {record.image_id}): "
                             "missing, corrupt or not an image")
        if image.shape[:2] != (record.height, record.width) and record.image_id not in self._size_warned:
            self._size_warned.add(record.image_id)
            logger.warning("%s (image id %d) is %dx%d but %s says %dx%d; boxes are used as given", record.path,
                           record.image_id, image.shape[1], image.shape[0], self.annotation_file.name,
                           record.width, record.height)
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return image.astype(np.float32) / 255.0

    def __getitem__(self, index: int) -> Sample:
        sample: Sample = {"img": self.load_image(index), "annot": self.load_annotations(index), "scale": 1.0,
                          "image_id": self._records[index].image_id}
        if self.transform is not None:
            sample = self.transform(sample, self.rng(index))
        return sample


# --------------------------------------------------------------------------------------------------
# Batching and loaders
# --------------------------------------------------------------------------------------------------

def collater(batch: Sequence[Sample]) -> Dict[str, Any]:
    """Stack samples of one size into a batch.

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
    images = torch.from_numpy(np.stack([np.asarray(s["img"], dtype=np.float32) for s in batch], axis=0))
    annots = [np.asarray(s["annot"], dtype=np.float32).reshape(-1, 5) for s in batch]
    max_boxes = max(1, max(len(a) for a in annots))
    padded = torch.full((len(batch), max_boxes, 5), -1.0, dtype=torch.float32)
    for i, annot in enumerate(annots):
        if len(annot):
            padded[i, :len(annot)] = torch.from_numpy(annot)
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
                       val_batch_size: Optional[int] = None) -> DataBundle:
    """Train and val sets of ``data_path/project.project_name`` and their DataLoaders.

    Train: ``project.train_set`` with normalise, [flip], [scale jitter + crop] or resize; shuffled (by
    ``torch.Generator().manual_seed(seed)`` when ``seed`` is set); ``drop_last=True`` as published.
    Val: ``project.val_set`` with normalise + resize, in order, every image (``drop_last=False``).
    ``sampler(dataset, train) -> Sampler`` replaces shuffling for both loaders, e.g.
    ``lambda ds, train: DistributedSampler(ds, shuffle=train, seed=seed or 0)`` (the caller calls its
    ``set_epoch``). Call ``train_set.set_epoch(epoch)`` each epoch for a new augmentation stream with
    ``seed`` set.

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
    train_set = CocoDataset(root, project.train_set, project, transform=train_tf, skip_missing=skip_missing,
                            seed=seed)
    val_set = CocoDataset(root, project.val_set, project, transform=val_tf, skip_missing=skip_missing, seed=seed)
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
