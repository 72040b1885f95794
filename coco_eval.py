"""COCO-style bbox evaluation of an EfficientDet checkpoint (pycocotools)::

    python coco_eval.py -c 0 -p coco -w weights/efficientdet-d0.pth

The published command line works with its published meaning: ``-p/--project``, ``-c/--compound_coef``,
``-w/--weights``, ``--nms_threshold``, ``--cuda BOOL`` (default True: CUDA when there is one, else the CPU
with a printed note; False: the CPU), ``--device N`` (the CUDA device index; ``cpu``, ``cuda``, ``cuda:N``
also work), ``--float16 BOOL`` and ``--override BOOL`` (default True: run the model and overwrite the
results file). Booleans take ``True``/``False`` (also ``true/false``, ``1/0``; a bare ``--flag`` is True).

Dataset layout (as the published script):

- images:      ``{data_path}/{project_name}/{val_set}/*.jpg``
- annotations: ``{data_path}/{project_name}/annotations/instances_{val_set}.json``

The detections are written to ``{output}/{val_set}_bbox_results.json`` (``--output`` defaults to the
current directory, where the published script writes them), with a provenance record beside it
(``{val_set}_bbox_results.json.meta.json``: sha256 of the weights, of the annotation file and of the
results, the compound coefficient, the project's name, classes, anchors and mean/std, threshold,
nms_threshold, nms, input size, max_images, mode and float16); both are written atomically.

``--override False`` re-scores the existing results file without running the model, but only when its
provenance record proves it came from the same weights, annotations and settings; otherwise the model
runs and one line says why (the first field that differs). The published script re-scored whatever file
was there, even one of other weights.

Prints pycocotools' 12 numbers and the AP of each class; ``--save_json`` writes them as JSON.
The checkpoint must have the project's class count: an evaluation never skips the class layer, and a
checkpoint holding NaN or inf values is refused (one line naming the tensor).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from backbone import check_input_size
from efficientdet.config import get_model_config
from efficientdet.dataset import annotation_path
from utils.device import select_device
from utils.evaluation import (detections_to_coco, evaluate_coco, file_sha256, format_metrics, load_coco_annotations,
                              metrics_to_json, provenance_mismatch, provenance_path, run_detector_on_set,
                              save_results)
from utils.inference import Detector
from utils.postprocess import EVAL_THRESHOLDS
from utils.project import ProjectConfig, load_project
from utils.cli import add_bool_arg, add_inference_args, add_model_args, run_script


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of the evaluator."""
    parser = argparse.ArgumentParser(description="COCO bbox mAP of an EfficientDet checkpoint (pycocotools)")
    add_model_args(parser, weights_help="checkpoint to evaluate (default weights/efficientdet-d{c}.pth)")
    parser.add_argument("--data_path", default="datasets/",
                        help="root of the datasets: {data_path}/{project_name}/... (default datasets/)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--threshold", type=float, default=EVAL_THRESHOLDS.score,
                        help="score threshold (default %(default)s)")
    parser.add_argument("--nms_threshold", type=float, default=EVAL_THRESHOLDS.iou,
                        help="NMS IoU threshold (default %(default)s)")
    parser.add_argument("--nms", choices=("hard", "soft"), default="hard",
                        help="hard: threshold + batched NMS (published); soft: the official evaluation "
                             "(top-5000, per-class gaussian soft-NMS, 100 boxes; ignores the thresholds)")
    parser.add_argument("--max_images", type=int, default=None,
                        help="evaluate only the first N images of the annotation file (default all)")
    add_bool_arg(parser, "--override", default=True,
                 help="True: run the model and overwrite {val_set}_bbox_results.json (published); False: re-score "
                      "that file when its provenance record shows the same weights and settings, else run the model")
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
    config = get_model_config(args.compound_coef)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.threshold < 1.0:
        raise ValueError(f"--threshold must be in [0, 1), got {args.threshold}")
    if not 0.0 < args.nms_threshold <= 1.0:
        raise ValueError(f"--nms_threshold must be in (0, 1], got {args.nms_threshold}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max_images must be >= 1, got {args.max_images}")
    if args.input_size is not None:
        check_input_size(config, args.input_size, args.input_size)


def resolve_device(cuda: bool, device: Optional[str]) -> Tuple[torch.device, Optional[str]]:
    """The device of the published ``--cuda BOOL`` and ``--device N`` (plus ours: cpu, cuda, cuda:N).

    ``cuda`` False: the CPU (a bare index N is ignored, as published). ``cuda`` True with no ``device`` or
    an index N: ``cuda:N`` (``cuda`` without N), or the CPU where this machine has no CUDA, returned with
    a note to print. An explicit cpu / cuda / cuda:N is used as given. Returns ``(device, note or None)``;
    ValueError (via :func:`utils.device.select_device`) for a device that does not exist here.
    """
    text = "" if device is None else str(device).strip().lower()
    if not cuda:
        if text.startswith("cuda"):
            raise ValueError(f"--cuda False asks for the CPU, but --device {device} names a CUDA device")
        return select_device("cpu" if text in ("", "auto") or text.isdigit() else text), None
    if text in ("", "auto") or text.isdigit():
        if not torch.cuda.is_available():
            return select_device("cpu"), ("note: no CUDA device on this machine: running on the CPU "
                                          "(--cuda False asks for the CPU)")
        return select_device(text if text.isdigit() else "cuda"), None
    return select_device(text), None


def results_provenance(args: argparse.Namespace, project: ProjectConfig, weights: Path,
                       ann_file: Path) -> Dict[str, Any]:
    """What determines the results of this run: the fields of the provenance record (JSON-ready)."""
    input_size = args.input_size if args.input_size is not None else get_model_config(args.compound_coef).input_size
    return {
        "weights_sha256": file_sha256(weights),
        "compound_coef": args.compound_coef,
        "project_name": project.project_name,
        "obj_list": list(project.obj_list),
        "anchors_scales": list(project.anchors_scales),
        "anchors_ratios": [list(r) for r in project.anchors_ratios],
        "mean": list(project.mean),
        "std": list(project.std),
        "annotations_sha256": file_sha256(ann_file),
        "threshold": args.threshold,
        "nms_threshold": args.nms_threshold,
        "nms": args.nms,
        "input_size": input_size,
        "max_images": args.max_images,
        "mode": args.mode,
        "float16": bool(args.float16),
    }


def compute_results(args: argparse.Namespace, project: ProjectConfig, image_dir: Path, ann_file: Path,
                    weights: Path, device: torch.device) -> Tuple[List[int], List[Dict[str, Any]]]:
    """Build the model, load ``weights`` (class count must match), detect on the set: (image_ids, records)."""
    detector = Detector.from_checkpoint(args.compound_coef, weights, project, input_size=args.input_size,
                                        device=device, float16=args.float16,
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
    ann_file = annotation_path(dataset, project.val_set)
    annotations = load_coco_annotations(ann_file, project.obj_list)  # FileNotFoundError naming it, before any work
    weights = Path(args.weights if args.weights else f"weights/efficientdet-d{args.compound_coef}.pth")
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    results_file = Path(args.output) / f"{project.val_set}_bbox_results.json"
    provenance = results_provenance(args, project, weights, ann_file)

    reuse = False
    if not args.override:
        reason = provenance_mismatch(results_file, provenance)
        if reason is None:
            reuse = True
            print(f"re-scoring {results_file} without running the model: its provenance record "
                  f"{provenance_path(results_file).name} shows the same weights and settings (--override False)")
        else:
            print(f"running the model although --override False: {reason}")

    if reuse:
        image_ids: List[int] = [int(image["id"]) for image in annotations["images"]][:args.max_images]
        results: Union[Path, List[Dict[str, Any]]] = results_file
    else:
        device, note = resolve_device(args.cuda, args.device)
        if note:
            print(note)
        image_ids, results = compute_results(args, project, image_dir, ann_file, weights, device)
        save_results(results_file, results, provenance)
        print(f"{len(results)} detections on {len(image_ids)} images written to {results_file}")

    metrics = evaluate_coco(ann_file, results, image_ids, project.obj_list)
    print(format_metrics(metrics, project.obj_list))
    if metrics["empty"]:
        print(f"mAP = 0: no detections above --threshold {args.threshold} on the {len(image_ids)} evaluated "
              "image(s)")
    if args.save_json:
        report = metrics_to_json(metrics)
        report.update(compound_coef=args.compound_coef, project=project.project_name, val_set=project.val_set,
                      results_file=str(results_file), threshold=args.threshold,
                      nms_threshold=args.nms_threshold, weights_sha256=provenance["weights_sha256"],
                      reused_results=reuse)
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
