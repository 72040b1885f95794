"""utils/evaluation.py against pycocotools called directly, on coco_tiny (real COCO ids 1–90, crowd
boxes) and shape (ids from 0)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from utils.evaluation import (STAT_NAMES, detections_to_coco, evaluate_coco, file_sha256, format_metrics,
                              load_results, metrics_to_json, provenance_mismatch, provenance_path,
                              run_detector_on_set, save_results)


@dataclass
class FakeDetections:
    """Same fields as ``utils.inference.detector.Detections`` (the evaluation only reads them)."""

    boxes: np.ndarray
    class_ids: np.ndarray
    scores: np.ndarray
    class_names: List[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def coco_tiny(shared_dir) -> Dict:
    ann_file = shared_dir / "data" / "coco_tiny" / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    return {"ann_file": ann_file, "data": data, "image_dir": shared_dir / "data" / "coco_tiny" / "val2017"}


def coco90_obj_list(data: Dict) -> List[str]:
    """90 entries: name at index category_id - 1, '' for the unused ids."""
    names = [""] * 90
    for category in data["categories"]:
        names[category["id"] - 1] = category["name"]
    return names


def gt_detections(data: Dict, shift: float = 0.0, crowd: bool = False, seed: int = None):
    """Per image (file order): the ground-truth boxes as detections, class index = category_id - 1.

    ``crowd``: the crowd boxes instead of the others. ``seed``: random scores instead of 1.
    """
    rng = np.random.default_rng(seed) if seed is not None else None
    image_ids, detections = [], []
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"] and bool(a["iscrowd"]) == crowd]
        boxes = np.array([[a["bbox"][0] + shift, a["bbox"][1] + shift, a["bbox"][0] + a["bbox"][2] + shift,
                           a["bbox"][1] + a["bbox"][3] + shift] for a in anns], dtype=np.float32).reshape(-1, 4)
        scores = (rng.uniform(0.05, 1.0, len(anns)) if rng is not None else np.ones(len(anns))).astype(np.float32)
        image_ids.append(image["id"])
        detections.append(FakeDetections(boxes, np.array([a["category_id"] - 1 for a in anns], dtype=np.int64),
                                         scores))
    return image_ids, detections


def pycocotools_eval(ann_file: Path, results_file: Path, image_ids=None):
    """COCOeval run the textbook way; returns (COCOeval, what summarize printed)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(str(results_file))
        coco_eval = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    return coco_eval, summary.getvalue()


def test_ground_truth_as_detections_gives_ap_1(coco_tiny):
    data = coco_tiny["data"]
    assert any(a["iscrowd"] for a in data["annotations"]), "coco_tiny should hold crowd boxes"
    image_ids, detections = gt_detections(data)
    results = detections_to_coco(image_ids, detections, coco90_obj_list(data))
    assert len(results) == sum(1 for a in data["annotations"] if not a["iscrowd"])
    metrics = evaluate_coco(coco_tiny["ann_file"], results, image_ids)
    assert metrics["empty"] is False
    # crowd boxes are not detected, yet they are not misses
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert metrics[name] == pytest.approx(1.0, abs=1e-12), name
    with_gt = {a["category_id"] for a in data["annotations"] if not a["iscrowd"]}
    for category_id, ap in metrics["per_class_ap"].items():
        if category_id in with_gt:
            assert ap == pytest.approx(1.0, abs=1e-12), category_id
        else:
            assert math.isnan(ap), category_id


def test_detections_on_crowd_boxes_are_not_false_positives(coco_tiny):
    data = coco_tiny["data"]
    obj_list = coco90_obj_list(data)
    image_ids, detections = gt_detections(data)
    _, crowd = gt_detections(data, crowd=True)
    for det, extra in zip(detections, crowd):  # crowd boxes with a lower score after each image's others
        det.boxes = np.concatenate([det.boxes, extra.boxes])
        det.class_ids = np.concatenate([det.class_ids, extra.class_ids])
        det.scores = np.concatenate([det.scores, np.full(len(extra.scores), 0.5, np.float32)])
    results = detections_to_coco(image_ids, detections, obj_list)
    assert len(results) == len(data["annotations"])
    metrics = evaluate_coco(coco_tiny["ann_file"], results, image_ids)
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["AP50"] == pytest.approx(1.0, abs=1e-12)


def test_shifted_boxes_score_exactly_as_pycocotools(coco_tiny, tmp_path):
    data = coco_tiny["data"]
    image_ids, detections = gt_detections(data, shift=5.0, seed=0)
    results = detections_to_coco(image_ids, detections, coco90_obj_list(data))
    results_file = tmp_path / "val2017_bbox_results.json"
    results_file.write_text(json.dumps(results))

    metrics = evaluate_coco(coco_tiny["ann_file"], results_file, image_ids)
    reference, summary = pycocotools_eval(coco_tiny["ann_file"], results_file, image_ids)

    assert [metrics[name] for name in STAT_NAMES] == [float(v) for v in reference.stats]
    assert 0.0 < metrics["AP"] < 0.9  # the shift costs AP at high IoU
    precision = reference.eval["precision"]
    for k, category_id in enumerate(reference.params.catIds):
        values = precision[:, :, k, 0, 2]
        expected = float(np.mean(values[values > -1])) if (values > -1).any() else math.nan
        assert metrics["per_class_ap"][category_id] == pytest.approx(expected, abs=0, nan_ok=True)
    # the 12 lines read exactly as pycocotools prints them
    assert format_metrics(metrics).splitlines()[:12] == summary.rstrip("\n").splitlines()


def test_image_subset_matches_pycocotools(coco_tiny, tmp_path):
    data = coco_tiny["data"]
    image_ids, detections = gt_detections(data, shift=3.0, seed=1)
    subset = image_ids[:10]
    results = detections_to_coco(image_ids, detections, coco90_obj_list(data))  # results for all 50 images
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    metrics = evaluate_coco(coco_tiny["ann_file"], results, subset)
    reference, _ = pycocotools_eval(coco_tiny["ann_file"], results_file, subset)
    assert [metrics[name] for name in STAT_NAMES] == [float(v) for v in reference.stats]
    assert metrics["num_images"] == 10


def test_category_mapping_on_original_coco_ids(coco_tiny, caplog):
    data = coco_tiny["data"]
    obj_list = coco90_obj_list(data)
    assert len(obj_list) == 90 and obj_list.count("") == 10
    image_ids, detections = gt_detections(data)
    results = detections_to_coco(image_ids, detections, obj_list)
    gt_pairs = sorted((a["image_id"], a["category_id"]) for a in data["annotations"] if not a["iscrowd"])
    assert sorted((r["image_id"], r["category_id"]) for r in results) == gt_pairs
    assert max(r["category_id"] for r in results) > 80  # ids beyond 80 survive the mapping

    metrics = evaluate_coco(coco_tiny["ann_file"], results, image_ids)
    assert sorted(metrics["per_class_ap"]) == sorted(c["id"] for c in data["categories"])
    table = format_metrics(metrics, obj_list)
    rows = {line.split()[0]: line for line in table.splitlines()[13:] if line.strip()}
    assert rows["1"].split()[:2] == ["1", "person"]
    top = max(r["category_id"] for r in results)  # the highest id with ground truth here
    assert obj_list[top - 1] in rows[str(top)] and "1.000" in rows[str(top)]

    # off by one (class index used as category id) breaks the score: the mapping is what makes AP 1
    shifted = [dict(r, category_id=r["category_id"] + 1) for r in results if r["category_id"] < 90]
    assert evaluate_coco(coco_tiny["ann_file"], shifted, image_ids)["AP"] < 0.2

    # a class whose obj_list entry is '' is left out, with a warning
    unused = obj_list.index("")
    det = FakeDetections(np.array([[1, 2, 11, 22], [0, 0, 5, 5]], np.float32), np.array([unused, 0]),
                         np.array([0.9, 0.8], np.float32))
    with caplog.at_level(logging.WARNING, logger="utils.evaluation"):
        records = detections_to_coco([7], [det], obj_list)
    assert records == [{"image_id": 7, "category_id": 1, "bbox": [0.0, 0.0, 5.0, 5.0], "score": float(np.float32(0.8))}]
    assert "1 detection(s) of unused classes" in caplog.text


def published_records(image_id, rois, class_ids, scores):
    """The published coco_eval.py records, written out: float32 rois made xywh in place, ``box.tolist()``,
    ``float(score)``, ``label + 1``."""
    rois = np.array(rois, dtype=np.float32)
    rois[:, 2] -= rois[:, 0]
    rois[:, 3] -= rois[:, 1]
    return [{"image_id": image_id, "category_id": int(label) + 1, "score": float(score), "bbox": box.tolist()}
            for box, label, score in zip(rois, class_ids, np.asarray(scores, np.float32))]


def test_detections_to_coco_record_format():
    det = FakeDetections(np.array([[10.25, 20.5, 110.75, 70.5]], np.float32), np.array([1]),
                         np.array([0.123456789], np.float32))
    (record,) = detections_to_coco([42], [det], ["a", "b"])
    assert record == {"image_id": 42, "category_id": 2, "bbox": [10.25, 20.5, 100.5, 50.0],
                      "score": float(np.float32(0.123456789))}
    assert all(type(v) is float for v in record["bbox"]) and type(record["score"]) is float
    # Unrounded float32 values with float32 widths, as the published script writes them: 1000.1 - 0.001 in
    # float32 is 1000.0989990234375 (in float64 of the same two float32 values: 1000.09897558589).
    rois = np.array([[0.001, 3.3, 1000.1, 7.7], [5.0, 5.0, 4.5, 4.0]], np.float32)  # the second: x2 < x1
    unrounded = FakeDetections(rois, np.array([0, 1]), np.array([0.987654321, 0.05000001], np.float32))
    records = detections_to_coco([3], [unrounded], ["a", "b"])
    assert records == published_records(3, rois, [0, 1], unrounded.scores)
    assert records[0]["bbox"][2] == 1000.0989990234375 and records[1]["bbox"][2] == -0.5
    json.dumps(record)  # plain Python types
    empty = FakeDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
    assert detections_to_coco([1], [empty], ["a"]) == []
    with pytest.raises(ValueError, match="class index 2 outside obj_list"):
        detections_to_coco([42], [FakeDetections(det.boxes, np.array([2]), det.scores)], ["a", "b"])
    with pytest.raises(ValueError, match="2 image ids for 1"):
        detections_to_coco([1, 2], [det], ["a", "b"])


def test_empty_results_give_zeros_and_flag(coco_tiny, tmp_path, capsys):
    metrics = evaluate_coco(coco_tiny["ann_file"], [])
    assert metrics["empty"] is True and metrics["num_detections"] == 0
    assert metrics["num_images"] == len(coco_tiny["data"]["images"])
    assert all(metrics[name] == 0.0 for name in STAT_NAMES)
    assert metrics["per_class_ap"][1] == 0.0  # person has ground truth: AP 0, not absent
    empty_file = tmp_path / "empty.json"
    empty_file.write_text("[]")
    assert evaluate_coco(coco_tiny["ann_file"], empty_file)["empty"] is True
    assert capsys.readouterr().out == ""  # the library prints nothing
    text = format_metrics(metrics)
    assert text.splitlines()[0].startswith("no detections")
    assert "maxDets=100 ] = 0.000" in text


def test_library_prints_nothing(coco_tiny, capsys):
    image_ids, detections = gt_detections(coco_tiny["data"], shift=2.0)
    evaluate_coco(coco_tiny["ann_file"], detections_to_coco(image_ids, detections,
                                                            coco90_obj_list(coco_tiny["data"])))
    assert capsys.readouterr().out == ""


def test_unknown_image_ids_raise(coco_tiny):
    record = {"image_id": 123456789, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}
    with pytest.raises(ValueError, match="123456789"):
        evaluate_coco(coco_tiny["ann_file"], [record])
    with pytest.raises(ValueError, match="evaluated image ids not in the annotations: 5"):
        evaluate_coco(coco_tiny["ann_file"], [], image_ids=[5])


def test_missing_or_malformed_files_raise(coco_tiny, tmp_path):
    missing = tmp_path / "nope" / "instances_val.json"
    with pytest.raises(FileNotFoundError, match="instances_val.json"):
        evaluate_coco(missing, [])
    with pytest.raises(FileNotFoundError, match="results.json"):
        evaluate_coco(coco_tiny["ann_file"], tmp_path / "results.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="bad.json: malformed JSON"):
        evaluate_coco(coco_tiny["ann_file"], bad)
    with pytest.raises(ValueError, match="record 0 lacks key 'score'"):
        load_results([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])


def test_annotation_id_zero_is_matched(shared_dir, tmp_path):
    """shape's annotation ids start at 0, which pycocotools takes for "unmatched": the evaluation
    renumbers them, so ground truth as detections scores a perfect AP (pycocotools alone gives less)."""
    data = json.loads((shared_dir / "data" / "shape" / "annotations" / "instances_val.json").read_text())
    data["images"] = data["images"][:2]
    keep = {image["id"] for image in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    assert any(a["id"] == 0 for a in data["annotations"])
    ann_file = tmp_path / "instances_val.json"
    ann_file.write_text(json.dumps(data))
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in data["annotations"]]
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    metrics = evaluate_coco(ann_file, results)
    assert metrics["AP"] == pytest.approx(1.0)
    reference, _ = pycocotools_eval(ann_file, results_file)
    assert float(reference.stats[0]) < 1.0


def test_metrics_to_json_is_strict_json(coco_tiny):
    metrics = evaluate_coco(coco_tiny["ann_file"], [])
    text = json.dumps(metrics_to_json(metrics), allow_nan=False)
    loaded = json.loads(text)
    assert loaded["AP"] == 0.0 and loaded["empty"] is True
    assert loaded["per_class_ap"]["1"] == 0.0
    assert None in loaded["per_class_ap"].values()  # categories without ground truth


class RecordingDetector:
    """Stands in for utils.inference.detector.Detector: records the batches, returns one box per image."""

    def __init__(self) -> None:
        self.batches: List[List[str]] = []

    def detect(self, images):
        self.batches.append(list(images))
        return [FakeDetections(np.array([[0, 0, 10, 10]], np.float32), np.array([0]), np.array([0.5], np.float32))
                for _ in images]


def test_run_detector_on_set_batches_in_file_order(shared_dir, tmp_path):
    shape = shared_dir / "data" / "shape"
    data = json.loads((shape / "annotations" / "instances_val.json").read_text())
    data["images"] = data["images"][:5]
    ann_file = tmp_path / "instances_val.json"
    ann_file.write_text(json.dumps(data))

    detector = RecordingDetector()
    image_ids, detections = run_detector_on_set(detector, shape / "val", ann_file, batch_size=2, progress=False)
    assert image_ids == [image["id"] for image in data["images"]]
    assert [len(b) for b in detector.batches] == [2, 2, 1]
    assert [Path(p).name for b in detector.batches for p in b] == [image["file_name"] for image in data["images"]]
    assert len(detections) == 5

    detector = RecordingDetector()
    image_ids, _ = run_detector_on_set(detector, shape / "val", ann_file, batch_size=8, max_images=3,
                                       progress=False)
    assert image_ids == [image["id"] for image in data["images"][:3]] and len(detector.batches) == 1

    with pytest.raises(ValueError, match="batch_size"):
        run_detector_on_set(detector, shape / "val", ann_file, batch_size=0)
    partial = tmp_path / "val"
    partial.mkdir()
    shutil.copy(shape / "val" / data["images"][0]["file_name"], partial)
    with pytest.raises(FileNotFoundError, match=data["images"][1]["file_name"]):
        run_detector_on_set(RecordingDetector(), partial, ann_file, progress=False)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        run_detector_on_set(RecordingDetector(), partial, tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------------
# input validation: each bad input is a one-line ValueError naming the file and the value (or, where it
# cannot change the number, a counted warning)


def perfect_results(data: Dict) -> List[Dict]:
    """The non-crowd ground truth of ``data`` as COCO result records with score 1."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
            for a in data["annotations"] if not a["iscrowd"]]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def one_line_error(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_duplicate_image_ids_in_ground_truth_raise(coco_tiny, tmp_path):
    data = json.loads(json.dumps(coco_tiny["data"]))
    first, second = data["images"][0], data["images"][1]
    second["id"] = first["id"]  # two images, one id: their boxes would be pooled under one image
    for ann in data["annotations"]:
        if ann["image_id"] == 37777:
            ann["image_id"] = first["id"]
    ann_file = write_json(tmp_path / "instances_dup.json", data)
    with pytest.raises(ValueError) as info:
        evaluate_coco(ann_file, perfect_results(data))
    message = one_line_error(info)
    assert "instances_dup.json" in message and f"image id {first['id']}: duplicate id" in message
    with pytest.raises(ValueError, match="duplicate id"):
        run_detector_on_set(RecordingDetector(), coco_tiny["image_dir"], ann_file, progress=False)


def test_result_image_ids_must_be_integers_of_the_annotation_file(coco_tiny, tmp_path):
    data = coco_tiny["data"]
    results = perfect_results(data)
    known = results[0]["image_id"]
    as_text = [dict(results[0], image_id=str(known))] + results[1:]  # pycocotools: a bare AssertionError
    with pytest.raises(ValueError) as info:
        evaluate_coco(coco_tiny["ann_file"], write_json(tmp_path / "text_ids.json", as_text))
    message = one_line_error(info)
    assert "text_ids.json: record 0" in message and repr(str(known)) in message and "not an integer" in message
    with pytest.raises(ValueError, match="record 3: image_id True is not an integer"):
        evaluate_coco(coco_tiny["ann_file"], results[:3] + [dict(results[3], image_id=True)])
    with pytest.raises(ValueError, match="result image ids not in the annotations: 999999999"):
        evaluate_coco(coco_tiny["ann_file"], results + [dict(results[0], image_id=999999999)])
    # an integral float is the same id: the same number as with ints
    as_float = [dict(r, image_id=float(r["image_id"])) for r in results]
    assert evaluate_coco(coco_tiny["ann_file"], as_float)["AP"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("field, value", [("score", math.nan), ("score", math.inf), ("score", "0.9"),
                                          ("bbox", [0.0, math.nan, 10.0, 10.0]), ("bbox", [0.0, 0.0, math.inf, 1.0])])
def test_non_finite_scores_and_boxes_raise(coco_tiny, tmp_path, field, value):
    results = perfect_results(coco_tiny["data"])
    results[5] = dict(results[5], **{field: value})
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))  # Python's json writes NaN / Infinity, and reads them back
    with pytest.raises(ValueError) as info:
        evaluate_coco(coco_tiny["ann_file"], results_file)
    message = one_line_error(info)
    assert f"results.json: record 5 (image_id {results[5]['image_id']})" in message
    assert "not a finite number" in message
    assert (repr(value) if field == "score" else ("nan" if math.nan in value or any(map(math.isnan, value))
                                                  else "inf")) in message


def test_negative_box_width_or_height_is_scored_as_pycocotools_does(coco_tiny, tmp_path, caplog):
    """The published clipping (x1 raised to 0, x2 lowered to W - 1) leaves a box starting past the input's
    right edge with x2 < x1: its record has a negative width; pycocotools scores it (never matched)."""
    results = perfect_results(coco_tiny["data"])
    x, y, w, h = results[2]["bbox"]
    flipped = dict(results[2], bbox=[x + w, y, -w, h])  # (x2, y, -w, h): a box given right to left
    both = dict(results[2], bbox=[x + w, y + h, -w, -h], score=0.5)  # a positive area, never matched
    with_negative = results[:2] + [flipped, both] + results[3:]
    results_file = write_json(tmp_path / "negative.json", with_negative)
    with caplog.at_level(logging.WARNING, logger="utils.evaluation"):
        metrics = evaluate_coco(coco_tiny["ann_file"], results_file)
    assert "2 result(s) with a negative width or height" in caplog.text
    reference, _ = pycocotools_eval(coco_tiny["ann_file"], results_file)
    assert [metrics[name] for name in STAT_NAMES] == [float(v) for v in reference.stats]
    assert metrics["AP"] < 1.0
    zero = dict(results[2], bbox=[x, y, 0.0, h])  # an empty box is a legal (missed) detection
    assert evaluate_coco(coco_tiny["ann_file"], results[:2] + [zero] + results[3:])["AP"] < 1.0
    # the same rule for the ground truth
    data = json.loads(json.dumps(coco_tiny["data"]))
    data["annotations"][4]["bbox"][3] = -1.0
    with pytest.raises(ValueError, match=rf"gt\.json: annotation id {data['annotations'][4]['id']} .*negative"):
        evaluate_coco(write_json(tmp_path / "gt.json", data), results)


def test_category_ids_outside_the_project_or_ground_truth(coco_tiny, tmp_path, caplog):
    data = coco_tiny["data"]
    obj_list = coco90_obj_list(data)
    results = perfect_results(data)
    # a category id as text never matches pycocotools' integer ids: its detections were silently dropped
    with pytest.raises(ValueError, match=r"record 0: category_id '1' is not an integer"):
        evaluate_coco(coco_tiny["ann_file"], [dict(results[0], category_id="1")])
    # with the project's classes: an id beyond obj_list, or an unused ('') one, is a model/project mismatch
    unused = obj_list.index("") + 1
    for bad in (91, unused, 0):
        with pytest.raises(ValueError) as info:
            evaluate_coco(coco_tiny["ann_file"], results + [dict(results[0], category_id=bad)], obj_list=obj_list)
        message = one_line_error(info)
        assert f"record {len(results)}" in message and f"category_id {bad} is not a class of the project" in message
    assert evaluate_coco(coco_tiny["ann_file"], results, obj_list=obj_list)["AP"] == pytest.approx(1.0, abs=1e-12)
    # ground truth in a category that 'categories' does not list would be ignored by pycocotools
    gt = json.loads(json.dumps(data))
    gt["categories"] = [c for c in gt["categories"] if c["id"] != 1]
    with pytest.raises(ValueError, match=r"annotation id \d+ \(annotations\[\d+\]\): category_id 1 is not in "
                                         r"'categories'"):
        evaluate_coco(write_json(tmp_path / "no_person.json", gt), results)
    # ground truth numbered from 0 (a common converter slip) does not fit the project's classes
    shifted = json.loads(json.dumps(data))
    for category in shifted["categories"]:
        category["id"] -= 1
    for ann in shifted["annotations"]:
        ann["category_id"] -= 1
    shifted_file = write_json(tmp_path / "from_zero.json", shifted)
    with pytest.raises(ValueError, match=r"from_zero\.json: annotation id \d+ .*category_id \d+ has no class in the "
                                         "project.s obj_list"):
        evaluate_coco(shifted_file, [], obj_list=obj_list)
    # harmless: results in a project class that the annotation file does not list (no ground truth can
    # exist there, so pycocotools' number is the same): counted in a warning
    extra_names = list(obj_list)
    extra_names[unused - 1] = "extra"
    with caplog.at_level(logging.WARNING, logger="utils.evaluation"):
        metrics = evaluate_coco(coco_tiny["ann_file"], results + [dict(results[0], category_id=unused)] * 2,
                                obj_list=extra_names)
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-12)
    assert f"2 result(s) have category ids absent from {coco_tiny['ann_file']} ({unused})" in caplog.text


def test_repeated_annotation_ids_are_renumbered(coco_tiny, tmp_path, caplog):
    """pycocotools keeps one annotation per id: two sharing an id scored perfect detections below 1."""
    data = json.loads(json.dumps(coco_tiny["data"]))
    plain = [a for a in data["annotations"] if not a["iscrowd"]]
    plain[1]["id"] = plain[0]["id"]
    plain[3]["id"] = plain[2]["id"]
    del plain[5]["area"]  # pycocotools reads 'area' (KeyError without it): width * height is used
    ann_file = write_json(tmp_path / "repeated.json", data)
    with caplog.at_level(logging.WARNING, logger="utils.evaluation"):
        metrics = evaluate_coco(ann_file, perfect_results(data))
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-12)
    assert "2 annotation(s) repeat another's id" in caplog.text


def test_annotations_of_unlisted_images_are_counted_and_left_out(coco_tiny, tmp_path, caplog):
    data = json.loads(json.dumps(coco_tiny["data"]))
    dropped = data["images"].pop(0)
    orphans = sum(1 for a in data["annotations"] if a["image_id"] == dropped["id"])
    ann_file = write_json(tmp_path / "subset.json", data)
    results = [r for r in perfect_results(data) if r["image_id"] != dropped["id"]]
    with caplog.at_level(logging.WARNING, logger="utils.evaluation"):
        metrics = evaluate_coco(ann_file, results)
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-12) and metrics["num_images"] == len(data["images"])
    assert f"{orphans} annotation(s) of images not listed in 'images' left out" in caplog.text


# --------------------------------------------------------------------------------------------------
# results files and their provenance record

PROVENANCE = {"weights_sha256": "a" * 64, "threshold": 0.05, "obj_list": ["rectangle", "circle"], "max_images": None}
RECORDS = [{"image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]


def test_saved_results_are_reusable_only_with_the_same_provenance(tmp_path):
    results_file = tmp_path / "out" / "val_bbox_results.json"
    assert provenance_mismatch(results_file, PROVENANCE) == f"no results file {results_file}"
    meta = save_results(results_file, RECORDS, PROVENANCE)
    assert meta == provenance_path(results_file) == tmp_path / "out" / "val_bbox_results.json.meta.json"
    assert json.loads(results_file.read_text()) == RECORDS
    record = json.loads(meta.read_text())
    assert record["results_sha256"] == file_sha256(results_file) and record["obj_list"] == ["rectangle", "circle"]
    assert provenance_mismatch(results_file, PROVENANCE) is None
    assert provenance_mismatch(results_file, dict(PROVENANCE, obj_list=("rectangle", "circle"))) is None  # JSON form

    reason = provenance_mismatch(results_file, dict(PROVENANCE, threshold=0.3))
    assert reason.startswith("threshold differs") and "recorded 0.05, now 0.3" in reason
    reason = provenance_mismatch(results_file, dict(PROVENANCE, weights_sha256="b" * 64))
    assert reason.startswith("weights_sha256 differs") and "aaaaaaaaaaaa…" in reason and "\n" not in reason
    assert provenance_mismatch(results_file, dict(PROVENANCE, mode="fused")).startswith("mode is not in")

    results_file.write_text(results_file.read_text() + " ")  # the results changed under the record
    assert "changed after its provenance record" in provenance_mismatch(results_file, PROVENANCE)
    meta.unlink()
    assert provenance_mismatch(results_file, PROVENANCE).startswith("no provenance record")
    meta.write_text("{")
    assert "unreadable provenance record" in provenance_mismatch(results_file, PROVENANCE)


def test_interrupted_save_never_leaves_a_valid_pair(tmp_path, monkeypatch):
    """New results written, record not (killed in between): the old record is gone, nothing is reusable."""
    results_file = tmp_path / "val_bbox_results.json"
    save_results(results_file, RECORDS, PROVENANCE)
    real_replace = os.replace

    def replace_results_only(source, target):  # the process dies between the two renames
        if str(target).endswith(".meta.json"):
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_results_only)
    other = [dict(RECORDS[0], score=0.9)]
    with pytest.raises(OSError, match="No space left"):
        save_results(results_file, other, dict(PROVENANCE, threshold=0.3))
    assert json.loads(results_file.read_text()) == other
    assert provenance_mismatch(results_file, PROVENANCE).startswith("no provenance record")
    assert provenance_mismatch(results_file, dict(PROVENANCE, threshold=0.3)).startswith("no provenance record")
    assert [p.name for p in tmp_path.iterdir()] == ["val_bbox_results.json"]  # no temporary file left
