"""COCO-style bbox evaluation of an EfficientDet checkpoint (pycocotools)::

    python coco_eval.py -c 0 -p coco -w weights/efficientdet-d0.pth

The published options keep their meaning: ``-p``, ``-c``, ``-w``, ``--nms_threshold``, ``--cuda BOOL`` (default
True: CUDA, else the CPU with a note), ``--device N`` (or ``cpu``, ``cuda:N``), ``--float16 BOOL``, ``--override
BOOL`` (default True: run the model); booleans also take ``true/false``, ``1/0``, a bare ``--flag``. Data as
published: ``{data_path}/{project_name}/{val_set}/`` and ``.../annotations/instances_{val_set}.json``.

The detections are the published evaluation's: ``preprocess`` -> model -> ``postprocess`` (boxes clipped to
the network input) -> ``invert_affine`` -> xywh, each value the float32 number the published script writes;
``--clip_boxes`` also clips boxes to the original image. They go to ``{output}/{val_set}_bbox_results.json``
(default: the current directory) with a provenance record beside it (:func:`utils.evaluation.evaluation_provenance`:
hashes of weights, annotations and results, every setting that shapes them, ``--clip_boxes`` included), both
written atomically. ``--override False`` re-scores that file without running the model only when its record
proves the same weights, annotations and settings; otherwise the model runs and one line says why (published:
re-scored whatever file was there). Prints pycocotools' 12 numbers and each class's AP (``--save_json``: also as
JSON). A checkpoint of another class count, or holding NaN or inf values, is refused (one line naming it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from backbone import check_input_size
from efficientdet.config import get_model_config
from efficientdet.dataset import annotation_path
from utils.config.cli import add_bool_arg, add_inference_args, add_model_args, add_threshold_args, run_script
from utils.config.device import resolve_published_device
from utils.config.project import ProjectConfig, load_project
from utils.evaluation import (detections_to_coco, evaluate_coco, evaluation_provenance, format_metrics,
                              load_coco_annotations, provenance_mismatch, provenance_path, run_detector_on_set,
                              save_metrics_json, save_results)
from utils.inference import Detector
from utils.inference.postprocess import EVAL_THRESHOLDS, Thresholds
from utils.weights.download import default_weights_path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of the evaluator."""
    parser = argparse.ArgumentParser(description="COCO bbox mAP of an EfficientDet checkpoint (pycocotools)")
    add_model_args(parser, weights_help="checkpoint to evaluate (default weights/efficientdet-d{c}.pth)")
    parser.add_argument("--data_path", default="datasets/",
                        help="root of the datasets: {data_path}/{project_name}/... (default datasets/)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward pass (default 1)")
    add_threshold_args(parser, EVAL_THRESHOLDS, iou_flag="--nms_threshold")
    parser.add_argument("--nms", choices=("hard", "soft"), default="hard",
                        help="hard: threshold + batched NMS (published); soft: the official evaluation "
                             "(top-5000, per-class gaussian soft-NMS, 100 boxes; ignores the thresholds)")
    parser.add_argument("--max_images", type=int, default=None,
                        help="evaluate only the first N images of the annotation file (default all)")
    add_bool_arg(parser, "--override", default=True,
                 help="True: run the model and overwrite {val_set}_bbox_results.json (published); False: re-score "
                      "that file when its provenance record shows the same weights and settings, else run the model")
    add_bool_arg(parser, "--clip_boxes", help="clip boxes to the original image (published: to the network input only)")
    add_bool_arg(parser, "--cuda", default=True,
                 help="True: CUDA (device --device), or the CPU with a note where there is no CUDA; False: the CPU")
    parser.add_argument("--output", default=".",
                        help="folder of {val_set}_bbox_results.json (default: the current directory)")
    parser.add_argument("--save_json", default=None, metavar="PATH", help="also write the metrics to PATH as JSON")
    add_bool_arg(parser, "--no_progress", help="no progress bar")
    add_inference_args(parser)
    return parser.parse_args(argv)


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
                    weights: Path) -> Tuple[List[int], List[Dict[str, Any]]]:
    """Build the model, load ``weights`` (class count must match), detect on the set: (image_ids, records)."""
    device, note = resolve_published_device(args.cuda, args.device)
    if note:
        print(note)
    detector = Detector.from_checkpoint(args.compound_coef, weights, project, input_size=args.input_size,
                                        device=device, float16=args.float16,
                                        threshold=args.threshold, iou_threshold=args.nms_threshold,
                                        nms=args.nms, mode=args.mode, clip_to_image=bool(args.clip_boxes))
    image_ids, detections = run_detector_on_set(detector, image_dir, ann_file, args.batch_size,
                                                args.max_images, progress=not args.no_progress)
    return image_ids, detections_to_coco(image_ids, detections, project.obj_list)


def evaluate(args: argparse.Namespace) -> int:
    """The work of :func:`main`; ValueError / FileNotFoundError on bad input."""
    check_args(args)
    project = load_project(args.project)
    dataset = Path(args.data_path) / project.project_name
    image_dir = dataset / project.val_set
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
        print(f"re-scoring {results_file} without running the model: its provenance record "
              f"{provenance_path(results_file).name} shows the same weights and settings (--override False)")
        image_ids: List[int] = [int(image["id"]) for image in annotations["images"]][:args.max_images]
        results: Union[Path, List[Dict[str, Any]]] = results_file
    else:
        if not args.override:
            print(f"running the model although --override False: {reason}")
        image_ids, results = compute_results(args, project, image_dir, ann_file, weights)
        save_results(results_file, results, provenance)
        print(f"{len(results)} detections on {len(image_ids)} images written to {results_file}")

    metrics = evaluate_coco(ann_file, results, image_ids, project.obj_list)
    print(format_metrics(metrics, project.obj_list))
    if metrics["empty"]:
        print(f"mAP = 0: no detections above --threshold {args.threshold} on the {len(image_ids)} evaluated "
              "image(s)")
    if args.save_json:
        save_path = save_metrics_json(args.save_json, metrics, compound_coef=args.compound_coef,
                                      project=project.project_name, val_set=project.val_set,
                                      results_file=str(results_file), threshold=args.threshold,
                                      nms_threshold=args.nms_threshold, weights_sha256=provenance["weights_sha256"],
                                      reused_results=reuse)
        print(f"metrics written to {save_path}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Evaluate; bad input gives one line on stderr and exit status 1."""
    return run_script(evaluate, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
