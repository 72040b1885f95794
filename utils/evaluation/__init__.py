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

or :func:`evaluate_detector` for all three; :func:`evaluate` is ``coco_eval.py`` from Python (its flags as keyword
arguments, :mod:`.cli`), returning the 12 numbers by name and each class's AP. Classes: ``obj_list[i]`` is COCO ``category_id = i + 1``
(as published). Boxes: :class:`utils.inference.detector.Detections` hold ``(x1, y1, x2, y2)`` in original image
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
the project, given ``obj_list``), a finite ``score`` and a finite ``bbox`` (a negative width or height, which
the published clipping leaves on a box starting past the input's right or bottom edge, is counted in a
warning and scored as pycocotools scores it: never matched). Results in a category of the project that the
annotation file does not list are harmless (pycocotools scores only the listed categories, and a category
without ground truth would add nothing), and so are annotations of images that ``images`` does not list
(never evaluated): both are counted in a warning.

Modules: :mod:`.records` (files in and out, validated), :mod:`.cocoeval` (COCOeval and its report),
:mod:`.runner` (a Detector over a set), :mod:`.provenance` (results files and their record), :mod:`.api` (the
work of ``coco_eval.py``) and :mod:`.cli` (its flags).
"""
from utils.evaluation.cocoeval import STAT_NAMES, evaluate_coco, format_metrics, metrics_to_json, save_metrics_json
from utils.evaluation.provenance import (PROVENANCE_FORMAT, PROVENANCE_SUFFIX, evaluation_provenance, file_sha256,
                                         provenance_mismatch, provenance_path, save_results)
from utils.evaluation.records import RESULT_KEYS, detections_to_coco, load_coco_annotations, load_results
from utils.evaluation.runner import evaluate_detector, run_detector_on_set
from utils.evaluation.api import evaluate, run_evaluation

__all__ = ["PROVENANCE_FORMAT", "PROVENANCE_SUFFIX", "RESULT_KEYS", "STAT_NAMES",
           "detections_to_coco", "evaluate", "evaluate_coco", "evaluate_detector", "evaluation_provenance",
           "file_sha256",
           "format_metrics", "load_coco_annotations", "load_results", "metrics_to_json", "provenance_mismatch",
           "provenance_path", "run_detector_on_set", "run_evaluation", "save_metrics_json", "save_results"]
