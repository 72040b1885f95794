"""``coco_eval.py``'s flags, defined once for the script and for :func:`utils.evaluation.evaluate` (same names
and defaults)."""
from __future__ import annotations

import argparse

from utils.config.cli import add_bool_arg, add_inference_args, add_model_args, add_threshold_args
from utils.inference.postprocess import EVAL_THRESHOLDS


def build_parser() -> argparse.ArgumentParser:
    """The evaluator's command line."""
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
    return parser
