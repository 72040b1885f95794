"""utils/evaluation.py against pycocotools called directly, on coco_tiny (real COCO ids 1–90, crowd
boxes) and shape (ids from 0)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from utils.evaluation import (STAT_NAMES, detections_to_coco, evaluate_coco, format_metrics, load_results,
                              metrics_to_json, run_detector_on_set)


@dataclass
class FakeDetections:
    """Same fields as ``utils.inference.Detections`` (the evaluation only reads them)."""

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
    assert records == [{"image_id": 7, "category_id": 1, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.8}]
    assert "1 detection(s) of unused classes" in caplog.text


def test_detections_to_coco_record_format():
    det = FakeDetections(np.array([[10.25, 20.5, 110.75, 70.5]], np.float32), np.array([1]),
                         np.array([0.123456789], np.float32))
    (record,) = detections_to_coco([42], [det], ["a", "b"])
    assert record == {"image_id": 42, "category_id": 2, "bbox": [10.25, 20.5, 100.5, 50.0], "score": 0.123457}
    assert all(type(v) is float for v in record["bbox"]) and type(record["score"]) is float
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
    """Stands in for utils.inference.Detector: records the batches, returns one box per image."""

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
