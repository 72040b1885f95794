"""COCO-format detection data: loading with validation, augmentation, batching (the published pipeline).

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

The image pipeline is :mod:`efficientdet.transforms` (augmentations: :mod:`efficientdet.augment`); image files
are checked and decoded by :mod:`efficientdet.image_files`; the COCO JSON readers are :mod:`efficientdet.coco`;
batching and the loaders are :mod:`efficientdet.loaders`, which imports this module (never the reverse). The
published names (``CocoDataset``, ``Resizer``, ``Normalizer``, ``Augmenter``, ``collater``, ...) are all
importable from here (the loader names on first use, :func:`__getattr__`).
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from efficientdet.augment import Mosaic, build_transform
from efficientdet.coco import (ProjectLike, _check_entry, _is_number, annotation_path, check_annotation,
                               check_category_names, obj_list_from_categories, read_coco_json, read_json)
from efficientdet.image_files import (PROBLEM_KINDS, PROGRESS_MIN_IMAGES, TAIL_BYTES, BadImageError, ImageInfo,
                                      ImageProblem, inspect_image_file, read_image, verify_image_files, verify_images)
from efficientdet.transforms import (MIN_BOX_SIZE, Augmenter, Compose, HorizontalFlip, Normalizer, PublishedTransform,
                                     RandomScaleCrop, Resizer, Sample, Transform, apply_transform, letterbox_size,
                                     resized_shape, takes_rng, to_unit_rgb)

logger = logging.getLogger(__name__)

# The published ``efficientdet.dataset`` names and the ones scripts and tests use, all importable from here.
__all__ = ["Augmenter", "BadImageError", "CocoDataset", "Compose", "DataBundle", "HorizontalFlip", "ImageInfo",
           "ImageProblem", "MIN_BOX_SIZE", "Normalizer", "PROBLEM_KINDS", "PROGRESS_MIN_IMAGES", "ProjectLike",
           "PublishedTransform", "RandomScaleCrop", "Resizer", "SKIP_REASONS", "Sample", "TAIL_BYTES", "Transform",
           "annotation_path", "apply_transform", "build_transform", "collater", "create_dataloaders",
           "inspect_image_file", "letterbox_size", "obj_list_from_categories", "read_coco_json", "read_image",
           "read_json", "resized_shape", "takes_rng", "verify_image_files", "verify_images"]


#: Reasons an annotation or image is left out, as counted in :attr:`CocoDataset.skipped`.
SKIP_REASONS = ("crowd", "degenerate", "outside", "missing_image", "bad_image")
#: Overshoot (pixels) beyond which a box counts as crossing the image border (counted in ``clipped``).
OUTSIDE_TOLERANCE = 1.0
#: Per reason, how many individual warnings are logged before only the summary counts.
_MAX_WARNINGS_PER_REASON = 10


class _ImageRecord(NamedTuple):
    image_id: int
    path: Path
    width: int
    height: int


class CocoDataset(Dataset):
    """A COCO-format detection set, validated when constructed.

    Args:
        root: the project's dataset folder (``--data_path/PROJECT``); ``root_dir`` is the published name.
        set_name: ``train2017``, ``val``, …: images in ``root/set_name``, annotations in
            ``root/annotations/instances_<set_name>.json``; ``set`` is the published name (default
            ``'train2017'``).
        obj_list: the project (``utils.config.project.ProjectConfig``) or its ``obj_list``; ``obj_list[category_id - 1]``
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
        mosaic: :class:`efficientdet.augment.Mosaic`: with its probability a sample is the mosaic of its image
            and three more drawn from the sample's generator (before ``transform``); None: off.

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
                 skip_bad_images: bool = False, verify_images: bool = True, progress: bool = True,
                 mosaic: Optional[Mosaic] = None) -> None:
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
        self.mosaic = mosaic
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
            check_category_names(data.get("categories"), self.obj_list, self.annotation_file)
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
        bbox = check_annotation(self.annotation_file, position, ann, images, self.obj_list)
        ann_id, category_id, record = ann["id"], ann["category_id"], images[ann["image_id"]]
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

    def image_hw(self, index: int) -> Tuple[int, int]:
        """``(height, width)`` of image ``index`` as the annotation file records it (no file is read)."""
        record = self._records[index]
        return record.height, record.width

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
        """``np.ndarray[H, W, 3] float32``, RGB in [0, 1] (:func:`efficientdet.transforms.to_unit_rgb`).

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
        return to_unit_rgb(image).astype(np.float32)  # float32 as published (same bits as x.astype(f32) / 255)

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
        rng, sample = self.rng(index), self.raw_sample(index)
        if self.mosaic is not None:
            sample = self.mosaic(sample, rng, self)
        if self.transform is not None:
            sample = apply_transform(self.transform, sample, rng)
        return sample

    def raw_sample(self, index: int) -> Sample:
        """Sample ``index`` before mosaic and transform: RGB in [0, 1] at its size, ``scale`` 1.0."""
        used, image = self._load_or_replace(index)
        return {"img": image, "annot": self.load_annotations(used), "scale": 1.0,
                "image_id": self._records[used].image_id}

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


def __getattr__(name: str) -> Any:
    """``DataBundle``, ``collater``, ``create_dataloaders`` from :mod:`efficientdet.loaders`, imported on first use
    (it imports this module)."""
    if name in ("DataBundle", "collater", "create_dataloaders"):
        return getattr(importlib.import_module("efficientdet.loaders"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
