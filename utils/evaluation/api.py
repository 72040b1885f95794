"""``coco_eval.py``'s work: :func:`run_evaluation` (a Namespace of its flags, :func:`utils.evaluation.cli.build_parser`)
and :func:`evaluate`, the same from Python with the flags as keyword arguments, returning the metrics.

Messages go to ``log`` (``coco_eval.py`` passes ``print``; by default ``logging``); bad input raises ValueError /
FileNotFoundError naming the file or option."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from backbone import check_input_size
from efficientdet.config import get_model_config
from efficientdet.dataset import annotation_path
from utils.config.cli import parse_with_settings
from utils.config.device import resolve_published_device
from utils.config.project import ProjectConfig, load_project
from utils.evaluation.cli import build_parser
from utils.evaluation.cocoeval import STAT_NAMES, evaluate_coco, format_metrics, save_metrics_json
from utils.evaluation.provenance import evaluation_provenance, provenance_mismatch, provenance_path, save_results
from utils.evaluation.records import detections_to_coco, load_coco_annotations
from utils.evaluation.runner import run_detector_on_set
from utils.inference.detector import Detector
from utils.inference.postprocess import Thresholds
from utils.weights.download import default_weights_path

logger = logging.getLogger(__name__)
Log = Callable[[str], None]
Compute = Callable[..., Tuple[List[int], List[Dict[str, Any]]]]


def check_args(args: argparse.Namespace) -> None:
    """Range checks that argparse cannot express; ValueError naming the option."""
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    Thresholds(args.threshold, args.nms_threshold)  # ValueError naming the bad one
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max_images must be >= 1, got {args.max_images}")
    if args.input_size is not None:
        check_input_size(get_model_config(args.compound_coef), args.input_size, args.input_size)


def compute_results(args: argparse.Namespace, project: ProjectConfig, image_dir: Path, ann_file: Path,
                    weights: Path, log: Log = logger.info) -> Tuple[List[int], List[Dict[str, Any]]]:
    """Build the model, load ``weights`` (class count must match), detect on the set: (image_ids, records)."""
    device, note = resolve_published_device(args.cuda, args.device)
    if note:
        log(note)
    detector = Detector.from_checkpoint(args.compound_coef, weights, project, input_size=args.input_size,
                                        device=device, float16=args.float16,
                                        threshold=args.threshold, iou_threshold=args.nms_threshold,
                                        nms=args.nms, mode=args.mode, clip_to_image=bool(args.clip_boxes))
    image_ids, detections = run_detector_on_set(detector, image_dir, ann_file, args.batch_size,
                                                args.max_images, progress=not args.no_progress)
    return image_ids, detections_to_coco(image_ids, detections, project.obj_list)


def run_evaluation(args: argparse.Namespace, log: Log = logger.info,
                   compute: Optional[Compute] = None) -> Dict[str, Any]:
    """Detect on the project's val set (or re-score a results file whose provenance matches, ``--override
    False``), write ``{output}/{val_set}_bbox_results.json`` and its record, score it: the metrics of
    :func:`utils.evaluation.evaluate_coco` (``--save_json``: also written). ``compute``: :func:`compute_results`."""
    check_args(args)
    project = load_project(args.project)
    dataset = Path(args.data_path) / project.project_name
    ann_file = annotation_path(dataset, project.val_set)
    annotations = load_coco_annotations(ann_file, project.obj_list)  # FileNotFoundError naming it, before any work
    weights = Path(args.weights) if args.weights else default_weights_path(args.compound_coef)
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    results_file = Path(args.output) / f"{project.val_set}_bbox_results.json"
    input_size = args.input_size or get_model_config(args.compound_coef).input_size
    provenance = evaluation_provenance(weights, ann_file, project, args.compound_coef, input_size,
                                       threshold=args.threshold, nms_threshold=args.nms_threshold, nms=args.nms,
                                       max_images=args.max_images, mode=args.mode, float16=bool(args.float16),
                                       clip_boxes=bool(args.clip_boxes))
    reason = provenance_mismatch(results_file, provenance) if not args.override else "--override True"
    reuse = reason is None
    if reuse:
        log(f"re-scoring {results_file} without running the model: its provenance record "
            f"{provenance_path(results_file).name} shows the same weights and settings (--override False)")
        image_ids: List[int] = [int(image["id"]) for image in annotations["images"]][:args.max_images]
        results: Union[Path, List[Dict[str, Any]]] = results_file
    else:
        if not args.override:
            log(f"running the model although --override False: {reason}")
        image_ids, results = (compute or compute_results)(args, project, dataset / project.val_set, ann_file,
                                                          weights, log=log)
        save_results(results_file, results, provenance)
        log(f"{len(results)} detections on {len(image_ids)} images written to {results_file}")

    metrics = evaluate_coco(ann_file, results, image_ids, project.obj_list)
    log(format_metrics(metrics, project.obj_list))
    if metrics["empty"]:
        log(f"mAP = 0: no detections above --threshold {args.threshold} on the {len(image_ids)} evaluated image(s)")
    if args.save_json:
        save_path = save_metrics_json(args.save_json, metrics, compound_coef=args.compound_coef,
                                      project=project.project_name, val_set=project.val_set,
                                      results_file=str(results_file), threshold=args.threshold,
                                      nms_threshold=args.nms_threshold, weights_sha256=provenance["weights_sha256"],
                                      reused_results=reuse)
        log(f"metrics written to {save_path}")
    return metrics


def evaluate(project: Union[str, Path], weights: Union[str, Path], compound_coef: int = 0,
             **settings: Any) -> Dict[str, Any]:
    """Evaluate like ``python coco_eval.py -c COMPOUND_COEF -p PROJECT -w WEIGHTS --FLAG VALUE ...``::

        metrics = evaluate("projects/shape.yml", "logs/shape/efficientdet-d0_best.pth", 0, data_path="datasets/")

    ``settings``: coco_eval.py's flags by name (``data_path``, ``output``, ``batch_size``, ``input_size``, ...);
    an unknown name is a ValueError naming it. Returns pycocotools' 12 numbers by name (:data:`STAT_NAMES`:
    ``AP`` ... ``ARl``; ``-1.0`` where an area range has no ground truth) and ``per_class_ap``: ``{class name:
    AP@[.5:.95]}`` (NaN for a class without ground truth)."""
    argv = ["-c", str(compound_coef), "-p", str(project), "-w", str(weights)]
    args = parse_with_settings(build_parser(), argv, settings, "evaluate()")
    metrics = run_evaluation(args)
    names = load_project(args.project).obj_list
    per_class = {names[cid - 1] if 0 < cid <= len(names) else str(cid): ap
                 for cid, ap in metrics["per_class_ap"].items()}
    return {**{name: metrics[name] for name in STAT_NAMES}, "per_class_ap": per_class}
