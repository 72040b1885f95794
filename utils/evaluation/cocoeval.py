"""pycocotools' COCOeval on validated input, and its report: the 12 numbers by name, per-class AP, the
printed table and JSON."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from utils.evaluation.records import load_coco_annotations, load_results

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
    data = _for_pycocotools(load_coco_annotations(ann_file, obj_list), ann_file)
    records = load_results(results)
    if obj_list is not None:
        origin = str(results) if isinstance(results, (str, Path)) else "results"
        _check_result_classes(records, obj_list, origin)

    coco_gt = _ground_truth(data)
    image_ids = _evaluated_image_ids(coco_gt, image_ids, ann_file)
    category_ids = sorted(coco_gt.getCatIds())
    _check_result_ids(records, coco_gt, image_ids, category_ids, ann_file)

    if records:
        stats, per_class_ap = _run_cocoeval(coco_gt, records, image_ids)
    else:
        stats = {name: 0.0 for name in STAT_NAMES}
        per_class_ap = _empty_per_class_ap(data, set(image_ids), category_ids)
    metrics: Dict[str, Any] = {**stats, "per_class_ap": per_class_ap}
    metrics.update(category_names={int(c["id"]): str(c.get("name", "")) for c in data["categories"]},
                   empty=not records, num_images=len(image_ids), num_detections=len(records))
    return metrics


def _ground_truth(data: Dict[str, Any]) -> Any:
    """A pycocotools ``COCO`` of the annotations ``data`` (indexed quietly, never read from a file)."""
    from pycocotools.coco import COCO

    coco_gt = COCO()
    coco_gt.dataset = data
    _quietly(coco_gt.createIndex)
    return coco_gt


def _check_result_classes(records: Sequence[Mapping[str, Any]], obj_list: Sequence[str], origin: str) -> None:
    """Raise ValueError for the first result whose ``category_id`` is not a class of ``obj_list``."""
    for index, record in enumerate(records):
        category_id = record["category_id"]
        if not (1 <= category_id <= len(obj_list) and obj_list[category_id - 1]):
            raise ValueError(f"{origin}: record {index} (image_id {record['image_id']}): category_id "
                             f"{category_id} is not a class of the project ({len(obj_list)} entries in obj_list"
                             f"{', this one unused' if 1 <= category_id <= len(obj_list) else ''})")


def _evaluated_image_ids(coco_gt: Any, image_ids: Optional[Sequence[int]], ann_file: PathLike) -> List[int]:
    """The requested image ids as ints (every image of ``coco_gt`` when ``None``), each checked known and unique."""
    if image_ids is None:
        return list(coco_gt.getImgIds())
    known_ids = set(coco_gt.getImgIds())
    image_ids = [int(i) for i in image_ids]
    unknown = [i for i in image_ids if i not in known_ids]
    if unknown:
        raise ValueError(f"{ann_file}: evaluated image ids not in the annotations: {_first_few(unknown)}")
    if len(set(image_ids)) != len(image_ids):
        repeated = sorted(i for i in set(image_ids) if image_ids.count(i) > 1)
        raise ValueError(f"evaluated image ids listed more than once: {_first_few(repeated)}")
    return image_ids


def _check_result_ids(records: Sequence[Mapping[str, Any]], coco_gt: Any, image_ids: Sequence[int],
                      category_ids: Sequence[int], ann_file: PathLike) -> None:
    """Raise for result image ids unknown to ``coco_gt``; warn of results outside ``image_ids`` or its categories."""
    unknown_results = sorted({int(r["image_id"]) for r in records} - set(coco_gt.getImgIds()))
    if unknown_results:
        raise ValueError(f"{ann_file}: result image ids not in the annotations: {_first_few(unknown_results)} "
                         "(results of another dataset?)")
    evaluated = set(image_ids)
    outside = sum(1 for r in records if int(r["image_id"]) not in evaluated)
    if outside:
        logger.warning("%d result(s) on images outside the %d evaluated ones are ignored", outside, len(evaluated))
    unknown_categories = sorted({int(r["category_id"]) for r in records} - set(category_ids))
    if unknown_categories:
        logger.warning("%d result(s) have category ids absent from %s (%s): pycocotools ignores them",
                       sum(1 for r in records if int(r["category_id"]) in unknown_categories), ann_file,
                       _first_few(unknown_categories))


def _empty_per_class_ap(data: Mapping[str, Any], evaluated: set, category_ids: Sequence[int]) -> Dict[int, float]:
    """Per-class AP without any result: 0.0 for a category with ground truth in ``evaluated``, else ``nan``."""
    gt_categories = {int(a["category_id"]) for a in data["annotations"]
                     if a.get("image_id") in evaluated and not a.get("iscrowd", 0)}
    return {c: (0.0 if c in gt_categories else math.nan) for c in category_ids}


def _run_cocoeval(coco_gt: Any, records: Sequence[Mapping[str, Any]],
                  image_ids: Sequence[int]) -> Tuple[Dict[str, float], Dict[int, float]]:
    """Run pycocotools' COCOeval (bbox) on ``image_ids``: the 12 stats by name and the AP per class."""
    from pycocotools.cocoeval import COCOeval

    coco_dt = _quietly(coco_gt.loadRes, records)
    coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
    coco_eval.params.imgIds = list(image_ids)
    _quietly(coco_eval.evaluate)
    _quietly(coco_eval.accumulate)
    _quietly(coco_eval.summarize)
    stats = {name: float(value) for name, value in zip(STAT_NAMES, coco_eval.stats)}
    return stats, _per_class_ap(coco_eval)


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


def save_metrics_json(path: Union[str, Path], metrics: Mapping[str, Any], **fields: Any) -> Path:
    """Write :func:`metrics_to_json` of ``metrics`` plus ``fields`` (run facts: weights hash, thresholds, ...) to
    ``path`` as indented JSON (its folder is created). Returns the path."""
    report = metrics_to_json(metrics)
    report.update(fields)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
    return path
