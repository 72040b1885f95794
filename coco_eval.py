"""COCO-style bbox evaluation of an EfficientDet checkpoint (pycocotools)::

    python coco_eval.py -c 0 -p coco -w weights/efficientdet-d0.pth

Dataset layout (as the published script):

- images:      ``{data_path}/{project_name}/{val_set}/*.jpg``
- annotations: ``{data_path}/{project_name}/annotations/instances_{val_set}.json``

The detections are written to ``{output}/{val_set}_bbox_results.json`` (``--output`` defaults to the
current directory, where the published script writes them). When that file exists, it is re-scored
without running the model unless ``--override`` is given (the script says which it does).
Prints pycocotools' 12 numbers and the AP of each class; ``--save_json`` writes them as JSON.
The checkpoint must have the project's class count: an evaluation never skips the class layer.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from efficientdet.config import get_model_config
from utils.device import select_device
from utils.evaluation import (detections_to_coco, evaluate_coco, format_metrics, load_coco_annotations,
                              metrics_to_json, run_detector_on_set)
from utils.inference import Detector
from utils.project import ProjectConfig, load_project
from utils.cli import add_bool_arg, add_inference_args, run_script


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of the evaluator."""
    parser = argparse.ArgumentParser(description="COCO bbox mAP of an EfficientDet checkpoint (pycocotools)")
    parser.add_argument("-c", "--compound_coef", type=int, default=0, help="model D0..D7x as 0..8 (default 0)")
    parser.add_argument("-p", "--project", default="coco",
                        help="project name (projects/NAME.yml) or path of a project YAML (default coco)")
    parser.add_argument("-w", "--weights", default=None,
                        help="checkpoint to evaluate (default weights/efficientdet-d{c}.pth)")
    parser.add_argument("--data_path", default="datasets/",
                        help="root of the datasets: {data_path}/{project_name}/... (default datasets/)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--threshold", type=float, default=0.05, help="score threshold (default 0.05)")
    parser.add_argument("--nms_threshold", type=float, default=0.5, help="NMS IoU threshold (default 0.5)")
    parser.add_argument("--nms", choices=("hard", "soft"), default="hard",
                        help="hard: threshold + batched NMS (published); soft: the official evaluation "
                             "(top-5000, per-class gaussian soft-NMS, 100 boxes; ignores the thresholds)")
    parser.add_argument("--max_images", type=int, default=None,
                        help="evaluate only the first N images of the annotation file (default all)")
    add_bool_arg(parser, "--override", help="run the model even when the results file exists (default: re-score that file)")
    parser.add_argument("--output", default=".",
                        help="folder of {val_set}_bbox_results.json (default: the current directory)")
    parser.add_argument("--save_json", default=None, metavar="PATH", help="also write the metrics to PATH as JSON")
    add_bool_arg(parser, "--no_progress", help="no progress bar")
    add_inference_args(parser)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Range checks that argparse cannot express; ValueError naming the option."""
    config = get_model_config(args.compound_coef)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.threshold < 1.0:
        raise ValueError(f"--threshold must be in [0, 1), got {args.threshold}")
    if not 0.0 < args.nms_threshold <= 1.0:
        raise ValueError(f"--nms_threshold must be in (0, 1], got {args.nms_threshold}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max_images must be >= 1, got {args.max_images}")
    if args.input_size is not None and (args.input_size <= 0 or args.input_size % config.max_stride):
        raise ValueError(f"--input_size must be a positive multiple of {config.max_stride} for {config.name}, "
                         f"got {args.input_size}")


def compute_results(args: argparse.Namespace, project: ProjectConfig, image_dir: Path, ann_file: Path,
                    weights: Path) -> Tuple[List[int], List[Dict[str, Any]]]:
    """Build the model, load ``weights`` (class count must match), detect on the set: (image_ids, records)."""
    detector = Detector.from_checkpoint(args.compound_coef, weights, project, input_size=args.input_size,
                                        device=select_device(args.device), float16=args.float16,
                                        threshold=args.threshold, iou_threshold=args.nms_threshold,
                                        nms=args.nms, mode=args.mode)
    image_ids, detections = run_detector_on_set(detector, image_dir, ann_file, args.batch_size,
                                                args.max_images, progress=not args.no_progress)
    return image_ids, detections_to_coco(image_ids, detections, project.obj_list)


def evaluate(args: argparse.Namespace) -> int:
    """The work of :func:`main`; raises ValueError / FileNotFoundError on bad input."""
    check_args(args)
    project = load_project(args.project)
    dataset = Path(args.data_path) / project.project_name
    image_dir = dataset / project.val_set
    ann_file = dataset / "annotations" / f"instances_{project.val_set}.json"
    annotations = load_coco_annotations(ann_file)  # FileNotFoundError naming it, before any work
    weights = Path(args.weights if args.weights else f"weights/efficientdet-d{args.compound_coef}.pth")
    results_file = Path(args.output) / f"{project.val_set}_bbox_results.json"

    if results_file.exists() and not args.override:
        print(f"re-scoring the existing {results_file} (pass --override to run the model again)")
        image_ids: List[int] = [int(image["id"]) for image in annotations["images"]][:args.max_images]
        results = results_file
    else:
        if not weights.is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")
        image_ids, results = compute_results(args, project, image_dir, ann_file, weights)
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results), encoding="utf-8")
        print(f"{len(results)} detections on {len(image_ids)} images written to {results_file}")

    metrics = evaluate_coco(ann_file, results, image_ids)
    print(format_metrics(metrics, project.obj_list))
    if metrics["empty"]:
        print(f"mAP = 0: no detections above --threshold {args.threshold} on the {len(image_ids)} evaluated "
              "image(s)")
    if args.save_json:
        report = metrics_to_json(metrics)
        report.update(compound_coef=args.compound_coef, project=project.project_name, val_set=project.val_set,
                      results_file=str(results_file), threshold=args.threshold,
                      nms_threshold=args.nms_threshold)
        save_path = Path(args.save_json)
        save_path.parent.mkdir(parents=True, exist_ok=True)
        save_path.write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
        print(f"metrics written to {save_path}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Evaluate; bad input gives one line on stderr and exit status 1."""
    return run_script(evaluate, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
