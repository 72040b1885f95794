"""COCO files in and out of the evaluation: the annotation file and result records, validated (every
problem a ValueError naming the file and the entry), and detections turned into result records (COCO xywh
appears only here)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from efficientdet.coco import read_coco_json, read_json

if TYPE_CHECKING:  # utils.inference.detector imports torch and the model; only its types are needed here
    from utils.inference.detector import Detections

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_id(value: Any) -> Optional[int]:
    """``value`` as an integer id: an int, or a float with an integral value (``139.0``); else None."""
    if _is_integer(value):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _box_problem(bbox: Any, negative_ok: bool = False) -> Optional[str]:
    """Why ``bbox`` is not a COCO ``[x, y, width, height]`` of finite numbers with width, height >= 0 (any
    sign with ``negative_ok``), or None."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox must be [x, y, w, h], got {bbox!r}"
    bad = [v for v in bbox if not _is_finite_number(v)]
    if bad:
        return f"bbox {list(bbox)!r} holds {bad[0]!r}, not a finite number"
    if not negative_ok and (bbox[2] < 0 or bbox[3] < 0):
        return f"bbox {list(bbox)!r} has a negative width or height"
    return None


def load_coco_annotations(ann_file: PathLike, obj_list: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Read a COCO instances JSON and validate what the evaluation relies on.

    Args:
        ann_file: COCO instances JSON.
        obj_list: the project's class names; when given, every annotation's ``category_id`` must have a
            non-empty ``obj_list[category_id - 1]`` (as training requires).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: one line naming the file and the offending entry: invalid JSON; ``images`` /
            ``annotations`` / ``categories`` missing or not lists; an image without an integer ``id`` or a
            ``file_name``, or an image id listed twice; a category without an integer ``id``; an annotation
            without an integer ``id`` or ``image_id``, with a ``category_id`` not in
            ``categories`` (or not a class of ``obj_list``), or a ``bbox`` that is not four finite numbers
            with width and height >= 0. (Annotations of images not listed in ``images`` are harmless, never
            evaluated: :func:`evaluate_coco` leaves them out with a counted warning.)
    """
    path = Path(ann_file)
    data = read_coco_json(path, ("images", "annotations", "categories"))
    image_ids: Dict[int, int] = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ValueError(f"{path}: images[{index}] lacks 'id' or 'file_name'")
        if not _is_integer(image["id"]):
            raise ValueError(f"{path}: images[{index}]: key 'id': expected an integer, got {image['id']!r}")
        if image["id"] in image_ids:
            raise ValueError(f"{path}: image id {image['id']}: duplicate id (images[{image_ids[image['id']]}] and "
                             f"images[{index}])")
        image_ids[image["id"]] = index
    category_ids = set()
    for index, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not _is_integer(category.get("id")):
            raise ValueError(f"{path}: categories[{index}]: expected an object with an integer 'id', "
                             f"got {category!r}")
        category_ids.add(category["id"])
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise ValueError(f"{path}: annotations[{index}]: expected an object, got {type(ann).__name__}")
        missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
        if missing:
            raise ValueError(f"{path}: annotation id {ann.get('id', '?')} (annotations[{index}]): missing key "
                             f"{missing[0]!r}")
        where = f"{path}: annotation id {ann['id']!r} (annotations[{index}])"
        if not _is_integer(ann["id"]):
            raise ValueError(f"{where}: key 'id': expected an integer")
        if not _is_integer(ann["image_id"]):
            raise ValueError(f"{where}: key 'image_id': expected an integer, got {ann['image_id']!r}")
        category_id = ann["category_id"]
        if not _is_integer(category_id) or category_id not in category_ids:
            raise ValueError(f"{where}: category_id {category_id!r} is not in 'categories'")
        if obj_list is not None and not (1 <= category_id <= len(obj_list) and obj_list[category_id - 1]):
            raise ValueError(f"{where}: category_id {category_id} has no class in the project's obj_list "
                             f"({len(obj_list)} entries, obj_list[category_id - 1] must be a non-empty name)")
        problem = _box_problem(ann["bbox"])
        if problem:
            raise ValueError(f"{where}: {problem}")
        if "area" in ann and not _is_finite_number(ann["area"]):
            raise ValueError(f"{where}: area {ann['area']!r} is not a finite number")
    return data


def load_results(results: Union[PathLike, Sequence[Mapping[str, Any]]]) -> List[Dict[str, Any]]:
    """COCO result records from a list or a JSON file, validated.

    Returns fresh dict copies (pycocotools' ``loadRes`` adds keys to the records it is given), with
    ``image_id`` and ``category_id`` as ints (``139.0`` is read as 139). A ``bbox`` with a negative width
    or height is kept, with a counted warning: the published pipeline writes one for a box that starts past
    the right or bottom edge of the network input (its clipping raises ``x1`` to 0 and lowers ``x2`` to
    ``W - 1`` only), and pycocotools never matches it (and ignores it where its area is negative).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: invalid JSON, not a list, or a record without ``image_id``/``category_id``/``bbox``/
            ``score``, with an id that is not an integer, or a non-finite (NaN, inf) or non-numeric ``score``
            or ``bbox`` value; the message names the file, the record index and the value.
    """
    origin = "results"
    if isinstance(results, (str, Path)):
        origin = str(results)
        results = read_json(results, "results file")
    if not isinstance(results, (list, tuple)):
        raise ValueError(f"{origin}: expected a list of COCO result records, got {type(results).__name__}")
    records: List[Dict[str, Any]] = []
    for index, record in enumerate(results):
        if not isinstance(record, Mapping):
            raise ValueError(f"{origin}: record {index} is {type(record).__name__}, expected an object")
        missing = [k for k in RESULT_KEYS if k not in record]
        if missing:
            raise ValueError(f"{origin}: record {index} lacks key {missing[0]!r}")
        record = dict(record)
        for key in ("image_id", "category_id"):
            value = _as_id(record[key])
            if value is None:
                raise ValueError(f"{origin}: record {index}: {key} {record[key]!r} is not an integer")
            record[key] = value
        where = f"{origin}: record {index} (image_id {record['image_id']})"
        if not _is_finite_number(record["score"]):
            raise ValueError(f"{where}: score {record['score']!r} is not a finite number")
        problem = _box_problem(record["bbox"], negative_ok=True)
        if problem:
            raise ValueError(f"{where}: {problem}")
        records.append(record)
    negative = sum(1 for r in records if r["bbox"][2] < 0 or r["bbox"][3] < 0)
    if negative:
        logger.warning("%s: %d result(s) with a negative width or height (a box starting past the right or bottom "
                       "edge of the network input, as the published clipping leaves it): never matched, scored as "
                       "pycocotools scores them", origin, negative)
    return records


# --------------------------------------------------------------------------------------------------
# detections -> COCO result records


def detections_to_coco(image_ids: Sequence[int], detections: Sequence["Detections"],
                       obj_list: Sequence[str]) -> List[Dict[str, Any]]:
    """COCO result records of per-image detections.

    Args:
        image_ids: COCO image id of each entry of ``detections``.
        detections: per image, ``boxes`` [K, 4] (x1, y1, x2, y2) in original image pixels,
            ``class_ids`` [K] (index into ``obj_list``), ``scores`` [K].
        obj_list: the project's class names; ``''`` marks an unused category id.

    Returns:
        ``{"image_id", "category_id" (class index + 1), "bbox" [x, y, w, h] (original pixels), "score"}``
        per detection, image by image in the given order. The numbers are those the published
        ``coco_eval.py`` writes: the float32 box with ``w = x2 - x1``, ``h = y2 - y1`` computed in float32,
        and the float32 score, each as the Python float of that value (unrounded).
        Detections of a class whose ``obj_list`` entry is ``''`` are left out (no ground truth can
        exist for an unused id, so the metrics are unchanged); their count is logged as a warning.

    Raises:
        ValueError: lengths differ, arrays have the wrong shape, or a class index is outside ``obj_list``.
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"got {len(image_ids)} image ids for {len(detections)} detection sets")
    records: List[Dict[str, Any]] = []
    skipped = 0
    for image_id, det in zip(image_ids, detections):
        boxes = np.array(det.boxes, dtype=np.float32)  # a copy: the published rois, made xywh in place
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        class_ids = np.asarray(det.class_ids).reshape(-1)
        scores = np.asarray(det.scores, dtype=np.float32).reshape(-1)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not (len(boxes) == len(class_ids) == len(scores)):
            raise ValueError(f"image {image_id}: boxes {np.shape(det.boxes)}, class_ids {class_ids.shape} and "
                             f"scores {scores.shape} do not describe the same K detections")
        boxes[:, 2] -= boxes[:, 0]
        boxes[:, 3] -= boxes[:, 1]
        for box, class_id, score in zip(boxes, class_ids, scores):
            class_id = int(class_id)
            if not 0 <= class_id < len(obj_list):
                raise ValueError(f"image {image_id}: class index {class_id} outside obj_list "
                                 f"({len(obj_list)} classes): model and project do not match")
            if obj_list[class_id] == "":
                skipped += 1
                continue
            records.append({"image_id": int(image_id), "category_id": class_id + 1, "bbox": box.tolist(),
                            "score": float(score)})
    if skipped:
        logger.warning("left out %d detection(s) of unused classes (obj_list entry '')", skipped)
    return records
