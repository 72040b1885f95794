"""COCO-style bbox evaluation, in one place for ``coco_eval.py`` and ``train.py`` ("best = best mAP").

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
annotation whose ``id`` is 0 could never be matched (the ``shape`` dataset starts its ids at 0). The
evaluation renumbers annotation ids (in memory, +1) when it sees an id 0.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from efficientdet.dataset import read_coco_json, read_json

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


def load_coco_annotations(ann_file: PathLike) -> Dict[str, Any]:
    """Read a COCO instances JSON and check its top-level structure.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON, or ``images`` / ``annotations`` / ``categories`` missing or not lists.
    """
    path = Path(ann_file)
    data = read_coco_json(path, ("images", "annotations", "categories"))
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ValueError(f"{path}: images[{index}] lacks 'id' or 'file_name'")
    return data


def load_results(results: Union[PathLike, Sequence[Mapping[str, Any]]]) -> List[Dict[str, Any]]:
    """COCO result records from a list or a JSON file, checked for the four keys.

    Returns fresh dict copies (pycocotools' ``loadRes`` adds keys to the records it is given).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: invalid JSON, not a list, or a record without ``image_id``/``category_id``/``bbox``
            (4 numbers)/``score``; the message names the file and the record index.
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
        bbox = record["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{origin}: record {index}: bbox must be [x, y, w, h], got {bbox!r}")
        records.append(dict(record))
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
                  image_ids: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """pycocotools COCOeval (bbox) of ``results`` against ``ann_file``, restricted to ``image_ids``.

    Args:
        ann_file: COCO instances JSON.
        results: COCO result records (see :func:`detections_to_coco`) or the path of a JSON list of them.
        image_ids: the images that were evaluated (images without detections count as misses);
            ``None``: every image of ``ann_file``.

    Returns:
        A dict with the 12 stats by name (:data:`STAT_NAMES`: ``AP`` … ``ARl``, floats, ``-1.0``
        where pycocotools reports -1), ``per_class_ap`` (``{category_id: AP}`` at IoU .50:.95,
        area all, maxDets 100, for every category of ``ann_file``; ``nan`` for a category without
        ground truth in the evaluated images), ``category_names`` (``{category_id: name}`` of
        ``ann_file``), ``empty`` (True when there were no result records: every stat is then 0.0
        and pycocotools is not run), ``num_images`` and ``num_detections``.

    Raises:
        FileNotFoundError: ``ann_file`` (or the results path) does not exist.
        ValueError: malformed files or records; result or requested image ids that are not in
            ``ann_file`` (the message names the first few).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = load_coco_annotations(ann_file)
    records = load_results(results)

    if any(ann.get("id") == 0 for ann in data["annotations"]):
        # pycocotools uses annotation id 0 to mean "unmatched": renumber (in memory only) so such a
        # ground truth can be matched. Ids carry no other meaning in the metric.
        logger.info("%s has an annotation with id 0: annotation ids shifted by 1 for pycocotools", ann_file)
        data = dict(data, annotations=[dict(a, id=int(a["id"]) + 1) for a in data["annotations"]])
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
    return evaluate_coco(ann_file, results, image_ids), results
