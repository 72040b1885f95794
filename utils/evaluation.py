"""COCO-style bbox evaluation, in one place for ``coco_eval.py`` and ``train.py`` ("best = best mAP").

A results file written by :func:`save_results` carries a provenance record beside it
(``{results}.meta.json``: hashes of the weights, annotations and results, and every setting that shapes
the detections); :func:`provenance_mismatch` tells whether an existing file may be re-scored instead of
running the model again.

The steps::

    image_ids, detections = run_detector_on_set(detector, image_dir, ann_file, batch_size=4)
    results = detections_to_coco(image_ids, detections, project.obj_list)   # COCO result records
    metrics = evaluate_coco(ann_file, results, image_ids)                  # pycocotools COCOeval
    print(format_metrics(metrics, project.obj_list))

or :func:`evaluate_detector` for all three. Classes: ``obj_list[i]`` is COCO ``category_id = i + 1``
(SPEC §3). Boxes: :class:`utils.inference.Detections` hold ``(x1, y1, x2, y2)`` in original image
pixels; COCO result records hold ``bbox = [x, y, w, h]`` (COCO xywh appears only here).

pycocotools prints while it works; everything it prints is captured and sent to ``logging`` (debug),
so library code prints nothing. The 12 numbers are pycocotools' own ``COCOeval.stats`` (``-1.0`` where
an area range has no ground truth, exactly as pycocotools reports it).

Note on annotation ids: pycocotools uses annotation id 0 to mean "unmatched", so a ground-truth
annotation whose ``id`` is 0 could never be matched (the ``shape`` dataset starts its ids at 0), and two
annotations sharing an id would be read as one. The evaluation renumbers annotation ids (in memory,
1…N, logged) when it sees an id 0 or a repeated id; ids carry no other meaning in the metric.

Input is validated as strictly as training input, so that a bad file is a one-line ValueError naming
it and the offending id or value, never a silently different number: image ids must be unique integers;
every annotation needs an integer ``id`` and ``image_id``, a ``category_id`` listed in ``categories`` (and,
given the project's ``obj_list``, a class of the project) and a ``bbox`` of four finite numbers with width
and height >= 0. Result records need integer ``image_id`` (of the annotation file) and ``category_id`` (of
the project, given ``obj_list``), a finite ``score`` and a finite ``bbox`` with width and height >= 0.
Results in a category of the project that the annotation file does not list are harmless (pycocotools
scores only the listed categories, and a category without ground truth would add nothing), and so are
annotations of images that ``images`` does not list (never evaluated): both are counted in a warning.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from efficientdet.coco import read_coco_json, read_json

if TYPE_CHECKING:  # utils.inference imports torch and the model; only its types are needed here
    from utils.inference import Detections, Detector

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# Names of COCOeval.stats, in pycocotools' order.
STAT_NAMES: Tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                               "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# (AP or AR, IoU label, area label, maxDets) of each stat, as pycocotools' summarize() prints them.
_STAT_LINES: Tuple[Tuple[str, str, str, int], ...] = (
    ("AP", "0.50:0.95", "all", 100), ("AP", "0.50", "all", 100), ("AP", "0.75", "all", 100),
    ("AP", "0.50:0.95", "small", 100), ("AP", "0.50:0.95", "medium", 100), ("AP", "0.50:0.95", "large", 100),
    ("AR", "0.50:0.95", "all", 1), ("AR", "0.50:0.95", "all", 10), ("AR", "0.50:0.95", "all", 100),
    ("AR", "0.50:0.95", "small", 100), ("AR", "0.50:0.95", "medium", 100), ("AR", "0.50:0.95", "large", 100),
)

BOX_DECIMALS = 2    # COCO ground truth has two decimals
SCORE_DECIMALS = 6  # float32 scores in [0, 1] keep their order at this precision

RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


# --------------------------------------------------------------------------------------------------
# reading files


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


def _box_problem(bbox: Any) -> Optional[str]:
    """Why ``bbox`` is not a COCO ``[x, y, width, height]`` of finite numbers with width, height >= 0, or None."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox must be [x, y, w, h], got {bbox!r}"
    bad = [v for v in bbox if not _is_finite_number(v)]
    if bad:
        return f"bbox {list(bbox)!r} holds {bad[0]!r}, not a finite number"
    if bbox[2] < 0 or bbox[3] < 0:
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
    ``image_id`` and ``category_id`` as ints (``139.0`` is read as 139).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: invalid JSON, not a list, or a record without ``image_id``/``category_id``/``bbox``/
            ``score``, with an id that is not an integer, a non-finite (NaN, inf) or non-numeric ``score``
            or ``bbox`` value, or a ``bbox`` with a negative width or height; the message names the file,
            the record index and the value.
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
        problem = _box_problem(record["bbox"])
        if problem:
            raise ValueError(f"{where}: {problem}")
        records.append(record)
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
        ``{"image_id", "category_id" (class index + 1), "bbox" [x, y, w, h] (original pixels,
        2 decimals), "score" (6 decimals)}`` per detection, image by image in the given order.
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
        boxes = np.asarray(det.boxes, dtype=np.float64)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        class_ids = np.asarray(det.class_ids).reshape(-1)
        scores = np.asarray(det.scores, dtype=np.float64).reshape(-1)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not (len(boxes) == len(class_ids) == len(scores)):
            raise ValueError(f"image {image_id}: boxes {np.shape(det.boxes)}, class_ids {class_ids.shape} and "
                             f"scores {scores.shape} do not describe the same K detections")
        for box, class_id, score in zip(boxes, class_ids, scores):
            class_id = int(class_id)
            if not 0 <= class_id < len(obj_list):
                raise ValueError(f"image {image_id}: class index {class_id} outside obj_list "
                                 f"({len(obj_list)} classes): model and project do not match")
            if obj_list[class_id] == "":
                skipped += 1
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            records.append({
                "image_id": int(image_id),
                "category_id": class_id + 1,
                "bbox": [round(x1, BOX_DECIMALS), round(y1, BOX_DECIMALS),
                         round(x2 - x1, BOX_DECIMALS), round(y2 - y1, BOX_DECIMALS)],
                "score": round(float(score), SCORE_DECIMALS),
            })
    if skipped:
        logger.warning("left out %d detection(s) of unused classes (obj_list entry '')", skipped)
    return records


# --------------------------------------------------------------------------------------------------
# COCOeval


def _quietly(function, *args, **kwargs):
    """Call a pycocotools function, sending what it prints to the debug log."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        value = function(*args, **kwargs)
    text = buffer.getvalue().strip()
    if text:
        logger.debug("pycocotools: %s", text)
    return value


def _first_few(values: Sequence[Any], count: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:count])
    return shown + (f", … ({len(values)} in all)" if len(values) > count else "")


def evaluate_coco(ann_file: PathLike, results: Union[PathLike, Sequence[Mapping[str, Any]]],
                  image_ids: Optional[Sequence[int]] = None,
                  obj_list: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """pycocotools COCOeval (bbox) of ``results`` against ``ann_file``, restricted to ``image_ids``.

    Args:
        ann_file: COCO instances JSON.
        results: COCO result records (see :func:`detections_to_coco`) or the path of a JSON list of them.
        image_ids: the images that were evaluated (images without detections count as misses);
            ``None``: every image of ``ann_file``.
        obj_list: the project's class names (``''`` for an unused id); when given, every result's and
            every annotation's ``category_id`` must be a class of the project.

    Returns:
        A dict with the 12 stats by name (:data:`STAT_NAMES`: ``AP`` … ``ARl``, floats, ``-1.0``
        where pycocotools reports -1), ``per_class_ap`` (``{category_id: AP}`` at IoU .50:.95,
        area all, maxDets 100, for every category of ``ann_file``; ``nan`` for a category without
        ground truth in the evaluated images), ``category_names`` (``{category_id: name}`` of
        ``ann_file``), ``empty`` (True when there were no result records: every stat is then 0.0
        and pycocotools is not run), ``num_images`` and ``num_detections``.

    Raises:
        FileNotFoundError: ``ann_file`` (or the results path) does not exist.
        ValueError: malformed files or records (see :func:`load_coco_annotations` and
            :func:`load_results`); result or requested image ids that are not in ``ann_file`` (the
            message names the first few); requested image ids listed twice; with ``obj_list``, a result
            category id that is not a class of the project.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = _for_pycocotools(load_coco_annotations(ann_file, obj_list), ann_file)
    records = load_results(results)
    origin = str(results) if isinstance(results, (str, Path)) else "results"
    if obj_list is not None:
        for index, record in enumerate(records):
            category_id = record["category_id"]
            if not (1 <= category_id <= len(obj_list) and obj_list[category_id - 1]):
                raise ValueError(f"{origin}: record {index} (image_id {record['image_id']}): category_id "
                                 f"{category_id} is not a class of the project ({len(obj_list)} entries in obj_list"
                                 f"{', this one unused' if 1 <= category_id <= len(obj_list) else ''})")

    coco_gt = COCO()
    coco_gt.dataset = data
    _quietly(coco_gt.createIndex)
    known_ids = set(coco_gt.getImgIds())
    if image_ids is None:
        image_ids = list(coco_gt.getImgIds())
    else:
        image_ids = [int(i) for i in image_ids]
        unknown = [i for i in image_ids if i not in known_ids]
        if unknown:
            raise ValueError(f"{ann_file}: evaluated image ids not in the annotations: {_first_few(unknown)}")
        if len(set(image_ids)) != len(image_ids):
            repeated = sorted(i for i in set(image_ids) if image_ids.count(i) > 1)
            raise ValueError(f"evaluated image ids listed more than once: {_first_few(repeated)}")
    unknown_results = sorted({int(r["image_id"]) for r in records} - known_ids)
    if unknown_results:
        raise ValueError(f"{ann_file}: result image ids not in the annotations: {_first_few(unknown_results)} "
                         "(results of another dataset?)")
    evaluated = set(image_ids)
    outside = sum(1 for r in records if int(r["image_id"]) not in evaluated)
    if outside:
        logger.warning("%d result(s) on images outside the %d evaluated ones are ignored", outside, len(evaluated))
    category_ids = sorted(coco_gt.getCatIds())
    unknown_categories = sorted({int(r["category_id"]) for r in records} - set(category_ids))
    if unknown_categories:
        logger.warning("%d result(s) have category ids absent from %s (%s): pycocotools ignores them",
                       sum(1 for r in records if int(r["category_id"]) in unknown_categories), ann_file,
                       _first_few(unknown_categories))

    category_names = {int(c["id"]): str(c.get("name", "")) for c in data["categories"]}
    metrics: Dict[str, Any] = {}
    if not records:
        gt_categories = {int(a["category_id"]) for a in data["annotations"]
                         if a.get("image_id") in evaluated and not a.get("iscrowd", 0)}
        metrics.update({name: 0.0 for name in STAT_NAMES})
        metrics["per_class_ap"] = {c: (0.0 if c in gt_categories else math.nan) for c in category_ids}
        metrics.update(category_names=category_names, empty=True, num_images=len(image_ids), num_detections=0)
        return metrics

    coco_dt = _quietly(coco_gt.loadRes, records)
    coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
    coco_eval.params.imgIds = list(image_ids)
    _quietly(coco_eval.evaluate)
    _quietly(coco_eval.accumulate)
    _quietly(coco_eval.summarize)

    metrics.update({name: float(value) for name, value in zip(STAT_NAMES, coco_eval.stats)})
    metrics["per_class_ap"] = _per_class_ap(coco_eval)
    metrics.update(category_names=category_names, empty=False, num_images=len(image_ids),
                   num_detections=len(records))
    return metrics


def _for_pycocotools(data: Dict[str, Any], ann_file: PathLike) -> Dict[str, Any]:
    """``data`` (validated by :func:`load_coco_annotations`) as pycocotools needs it, changed in memory only:
    annotations of images not in ``images`` left out (never evaluated), annotation ids renumbered 1…N when
    one is 0 ("unmatched" to pycocotools) or repeated (pycocotools would keep only one of them), and a
    missing ``area`` set to the box's ``width * height`` (pycocotools reads ``area`` for its area ranges).
    Each change is logged with its count."""
    image_ids = {image["id"] for image in data["images"]}
    annotations = [ann for ann in data["annotations"] if ann["image_id"] in image_ids]
    orphans = len(data["annotations"]) - len(annotations)
    if orphans:
        logger.warning("%s: %d annotation(s) of images not listed in 'images' left out (never evaluated)",
                       ann_file, orphans)
    ids = [ann["id"] for ann in annotations]
    repeated = len(ids) - len(set(ids))
    no_area = sum(1 for ann in annotations if "area" not in ann)
    if not repeated and 0 not in set(ids) and not no_area:
        return dict(data, annotations=annotations) if orphans else data
    if repeated:
        logger.warning("%s: %d annotation(s) repeat another's id: annotation ids renumbered 1..%d in memory "
                       "(ids carry no meaning in the metric)", ann_file, repeated, len(ids))
    elif 0 in set(ids):
        logger.info("%s has an annotation with id 0: annotation ids renumbered 1..%d for pycocotools",
                    ann_file, len(ids))
    if no_area:
        logger.info("%s: %d annotation(s) without 'area': width * height of the box used", ann_file, no_area)
    renumber = bool(repeated) or 0 in set(ids)
    fixed = []
    for number, ann in enumerate(annotations, start=1):
        ann = dict(ann)
        if renumber:
            ann["id"] = number
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        fixed.append(ann)
    return dict(data, annotations=fixed)


def _per_class_ap(coco_eval: Any) -> Dict[int, float]:
    """AP per category from ``eval['precision']`` [T, R, K, A, M]: IoU .50:.95, area all, maxDets 100."""
    params = coco_eval.params
    precision = coco_eval.eval["precision"]
    area = params.areaRngLbl.index("all")
    max_dets = params.maxDets.index(100)
    per_class: Dict[int, float] = {}
    for k, category_id in enumerate(params.catIds):
        values = precision[:, :, k, area, max_dets]
        values = values[values > -1]
        per_class[int(category_id)] = float(np.mean(values)) if values.size else math.nan
    return per_class


# --------------------------------------------------------------------------------------------------
# reporting


def _class_name(category_id: int, obj_list: Optional[Sequence[str]], metrics: Mapping[str, Any]) -> str:
    if obj_list is not None and 1 <= category_id <= len(obj_list) and obj_list[category_id - 1]:
        return obj_list[category_id - 1]
    return str(metrics.get("category_names", {}).get(category_id, "?"))


def format_metrics(metrics: Mapping[str, Any], obj_list: Optional[Sequence[str]] = None) -> str:
    """The 12 lines in pycocotools' wording, then a table of AP per class.

    Class names come from ``obj_list`` (``category_id - 1``), else from the annotation file.
    """
    lines: List[str] = []
    if metrics.get("empty"):
        lines.append(f"no detections on the {metrics.get('num_images', 0)} evaluated image(s): every metric is 0")
    for name, (kind, iou, area, max_dets) in zip(STAT_NAMES, _STAT_LINES):
        title = "Average Precision  (AP)" if kind == "AP" else "Average Recall     (AR)"
        lines.append(f" {title} @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = "
                     f"{float(metrics[name]):0.3f}")
    per_class = metrics.get("per_class_ap", {})
    if per_class:
        names = {cid: _class_name(cid, obj_list, metrics) for cid in per_class}
        width = max(8, max(len(n) for n in names.values()))
        lines.append("")
        lines.append(f"{'id':>4}  {'class':<{width}}  AP@[.50:.95]")
        for category_id in sorted(per_class):
            ap = per_class[category_id]
            value = "-  (no ground truth)" if ap is None or math.isnan(ap) else f"{ap:0.3f}"
            lines.append(f"{category_id:>4}  {names[category_id]:<{width}}  {value}")
    return "\n".join(lines)


def metrics_to_json(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    """``metrics`` as JSON-ready values: NaN → ``None``, category ids as string keys."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        return value

    return {str(k): clean(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------------
# running a detector over a COCO-style set


def run_detector_on_set(detector: "Detector", image_dir: PathLike, ann_file: PathLike, batch_size: int = 1,
                        max_images: Optional[int] = None,
                        progress: bool = True) -> Tuple[List[int], List["Detections"]]:
    """Detect on the images of ``ann_file`` (in the file's order) found in ``image_dir``.

    Args:
        detector: anything with ``detect(list of paths) -> list of Detections``
            (:class:`utils.inference.Detector`).
        image_dir: folder of the images (``file_name`` of each ``images`` entry).
        ann_file: COCO instances JSON.
        batch_size: paths per ``detector.detect`` call.
        max_images: only the first ``max_images`` images (``None``: all).
        progress: show a tqdm bar.

    Returns:
        ``(image_ids, detections)``, one entry per image.

    Raises:
        FileNotFoundError: the annotation file, the image folder or an image is missing (checked
            before any detection runs).
        ValueError: ``batch_size`` or ``max_images`` below 1, or the detector returns the wrong count.
    """
    from tqdm import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                   or max_images < 1):
        raise ValueError(f"max_images must be an integer >= 1 or None, got {max_images!r}")
    images = load_coco_annotations(ann_file)["images"]
    if max_images is not None:
        images = images[:max_images]
    folder = Path(image_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = [folder / str(image["file_name"]) for image in images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image not found: {missing[0]}"
                                + (f" (and {len(missing) - 1} more listed in {ann_file})" if len(missing) > 1 else ""))

    image_ids = [int(image["id"]) for image in images]
    detections: List["Detections"] = []
    with tqdm(total=len(paths), desc="detecting", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch = [str(p) for p in paths[start:start + batch_size]]
            found = detector.detect(batch)
            if len(found) != len(batch):
                raise ValueError(f"detector returned {len(found)} results for {len(batch)} images")
            detections.extend(found)
            bar.update(len(batch))
    return image_ids, detections


def evaluate_detector(detector: "Detector", image_dir: PathLike, ann_file: PathLike, obj_list: Sequence[str],
                      batch_size: int = 1, max_images: Optional[int] = None,
                      progress: bool = False) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Detect, convert and score in one call (for ``train.py``): ``(metrics, result records)``.

    ``metrics["AP"]`` is the COCO mAP@[.50:.95]; see :func:`evaluate_coco` for the rest.
    """
    image_ids, detections = run_detector_on_set(detector, image_dir, ann_file, batch_size, max_images, progress)
    results = detections_to_coco(image_ids, detections, obj_list)
    return evaluate_coco(ann_file, results, image_ids, obj_list), results


# --------------------------------------------------------------------------------------------------
# results files and their provenance

PROVENANCE_SUFFIX = ".meta.json"
PROVENANCE_FORMAT = 1
_HASH_CHUNK = 1 << 20


def provenance_path(results_file: PathLike) -> Path:
    """The provenance record of ``results_file``: ``{results_file}.meta.json`` beside it."""
    path = Path(results_file)
    return path.with_name(path.name + PROVENANCE_SUFFIX)


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks). FileNotFoundError naming a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(data: bytes, path: Path) -> None:
    """``data`` to ``path`` through a temporary file beside it and ``os.replace``: ``path`` holds its old
    content or the new one, never a part. OSError naming ``path`` (the temporary file is removed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing with a stored record."""
    return json.loads(json.dumps(value, allow_nan=False))


def save_results(results_file: PathLike, records: Sequence[Mapping[str, Any]],
                 provenance: Mapping[str, Any]) -> Path:
    """Write COCO result records to ``results_file`` and their provenance record beside it.

    Args:
        results_file: the JSON list to write (its folder is created).
        records: COCO result records (:func:`detections_to_coco`).
        provenance: JSON-ready facts that determine ``records`` (weights hash, settings, ...); the record
            adds ``results_sha256`` (the hash of the bytes written) and ``format``.

    Both files are written atomically, the old record removed first: a results file is never paired
    with a record of other results (and the results hash in the record catches a half-finished pair).
    Returns the path of the provenance record.
    """
    results_file = Path(results_file)
    meta_file = provenance_path(results_file)
    data = json.dumps(list(records), allow_nan=False).encode("utf-8")
    record = dict(_plain(dict(provenance)), format=PROVENANCE_FORMAT,
                  results_sha256=hashlib.sha256(data).hexdigest())
    results_file.parent.mkdir(parents=True, exist_ok=True)
    meta_file.unlink(missing_ok=True)
    _write_atomically(data, results_file)
    _write_atomically(json.dumps(record, indent=2, sort_keys=True).encode("utf-8"), meta_file)
    return meta_file


def _shown(value: Any) -> str:
    text = repr(value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"  # a sha256
    return text if len(text) <= 60 else text[:60] + "…"


def provenance_mismatch(results_file: PathLike, provenance: Mapping[str, Any]) -> Optional[str]:
    """Why ``results_file`` may NOT be re-scored for ``provenance``, or None when it may.

    It may when the file and its record (:func:`provenance_path`) exist, the record holds every field of
    ``provenance`` with the same value, and the file's sha256 is the record's ``results_sha256``. The
    reason (one line) names the first field that differs, with both values.
    """
    results_file = Path(results_file)
    meta_file = provenance_path(results_file)
    if not results_file.is_file():
        return f"no results file {results_file}"
    if not meta_file.is_file():
        return f"no provenance record {meta_file} beside {results_file}"
    try:
        record = read_json(meta_file, "provenance record")
    except ValueError as exc:
        return f"unreadable provenance record ({exc})"
    if not isinstance(record, dict):
        return f"{meta_file}: not a provenance record"
    if record.get("format") != PROVENANCE_FORMAT:
        return f"{meta_file}: provenance format {record.get('format')!r}, expected {PROVENANCE_FORMAT}"
    for key, value in _plain(dict(provenance)).items():
        if key not in record:
            return f"{key} is not in the provenance record {meta_file}"
        if record[key] != value:
            return (f"{key} differs from the provenance record of {results_file} "
                    f"(recorded {_shown(record[key])}, now {_shown(value)})")
    if record.get("results_sha256") != file_sha256(results_file):
        return f"{results_file} changed after its provenance record was written (results_sha256 differs)"
    return None
